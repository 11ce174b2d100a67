"""The text of MNT/README: a short guide for someone who just ran ``ls``."""

README = """\
mktme-sandbox: an emulated Intel MKTME machine (multi-key total memory
encryption) under a simulated Linux memory manager, mounted as files.

  README            this guide
  dmesg             kernel log: boot lines, one line per refused command
  dram              raw DRAM, offset = physical address: ciphertext as stored
  swap              the swap partition as stored (madvise ... pageout fills it)
  keys/N            KeyID N: read its state, write a key command
  keyids/N/mem      physical memory through KeyID N, as the CPU sees it
  spaces/           mkdir NAME: a new address space; rmdir NAME: gone
    NAME/ctl        mmap/munmap/mprotect/encrypt_mprotect/madvise commands
    NAME/maps       /proc/PID/maps;  NAME/smaps adds "KeyID:" per VMA
    NAME/mem        virtual memory, offset = virtual address
    NAME/vmas/      one file per VMA, START-END as in maps, offset 0 = START
    NAME/pagemap    /proc/PID/pagemap (PFNs without KeyID bits)
    NAME/cr3, tlb   page-table root; write "flush" to flush the TLB
  pagetables/       NAME: the space's page tables; kernel: direct mappings
  mm/               counters, free pools, mitigation switches, ksm,
                    khugepaged, kpageflags, page_keyid, check ("ok"),
                    keyid_map.svg (a picture: one cell per page, by KeyID),
                    snapshot (root: save/restore/coldboot PATH),
                    swaps, swap_encryption
  hw/               msr (8-byte reads at 0x981..0x984), tme, cache

Control files take one command per write and refuse a bad one with an
errno (EINVAL, ENOKEY, EBUSY, EACCES, ...), logging the reason to dmesg.

Try (from this directory):
  echo 'type=cpu algorithm=aes-xts-128' > keys/1; cat keys/1
  mkdir spaces/demo
  echo 'mmap 0x10000000 4096 rw- keyid=1 populate' > spaces/demo/ctl
  printf secret | dd of=spaces/demo/mem bs=4096 seek=$((0x10000000)) \\
      oflag=seek_bytes conv=notrunc
  cat spaces/demo/smaps pagetables/demo
  xxd -s $((0x10000000)) -l 64 spaces/demo/mem    # the CPU view: plaintext
  cat mm/check; tail -n 3 dmesg
  rmdir spaces/demo

Unmount with: mktme-sandbox umount MOUNTPOINT
"""
