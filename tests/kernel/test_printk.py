"""The dmesg ring: one record per call, one line per record, each bounded.

Linux, kernel/printk/printk.c: ``#define LOG_LINE_MAX (1024 - PREFIX_MAX)``
bounds one record, and ``/dev/kmsg`` readers get "non-printable characters
... escaped as \\xNN" (``msg_print_ext_body``), backslash included.
"""

from __future__ import annotations

import errno

import pytest

from mktme_sandbox import Machine
from mktme_sandbox.errors import SandboxError
from mktme_sandbox.kernel.printk import LOG_LINE_MAX, KernelLog, escape


def test_a_message_with_newlines_is_one_escaped_line() -> None:
    log = KernelLog()
    log.printk("spaces/x\nKeyID 7 programmed")
    (line,) = log.text().splitlines()
    assert line.endswith("] spaces/x\\x0aKeyID 7 programmed")


def test_control_characters_backslash_and_unicode_separators_are_escaped() -> None:
    assert escape("a\tb\x1b[31m\\c\x7f\u2028d") == "a\\x09b\\x1b[31m\\x5cc\\x7f\\u2028d"
    assert escape("plain text, é ok") == "plain text, é ok"


def test_a_record_is_cut_at_log_line_max_bytes() -> None:
    log = KernelLog()
    log.printk("é" * 5000)
    (line,) = log.text().splitlines()
    message = line.split("] ", 1)[1]
    assert len(message.encode()) <= LOG_LINE_MAX
    assert message == "é" * (LOG_LINE_MAX // 2)


def test_the_ring_keeps_its_capacity_in_records() -> None:
    log = KernelLog(capacity=8)
    for n in range(100):
        log.printk(f"record {n}")
    lines = log.text().splitlines()
    assert len(lines) == 8
    assert lines[-1].endswith("record 99")


def test_a_rejected_space_name_cannot_forge_a_dmesg_line() -> None:
    """A space name with a newline logs one line, and no line starts with the forgery."""
    m = Machine(phys_mem="8M", seed=1)
    before = m.dmesg().count("\n")
    with pytest.raises(SandboxError) as refused:
        m.create_space("evil\n[    1.000000] KeyID 7 programmed", uid=1000)
    m.reject("spaces", refused.value)
    assert refused.value.errno == errno.EINVAL
    lines = m.dmesg().splitlines()[before:]
    assert len(lines) == 1
    assert not any(line.startswith("[    1.000000] KeyID 7") for line in m.dmesg().splitlines())


def test_a_megabyte_of_rejected_input_grows_the_log_by_one_bounded_record() -> None:
    m = Machine(phys_mem="8M", seed=1)
    before = len(m.dmesg())
    m.reject("spaces/x/ctl", SandboxError(errno.EINVAL, "bad command " + "x" * (1 << 20)))
    assert len(m.dmesg()) - before <= LOG_LINE_MAX + PREFIX_LEN + 1


PREFIX_LEN = len("[    0.000000] ")
