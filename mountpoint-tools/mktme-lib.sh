# shellcheck shell=bash
# mktme-lib.sh: what the shell tools of this folder share. Sourced, not run.
#
# Only bash builtins, coreutils and xxd: the tools prove that the mount alone
# is a complete interface. Provides:
#   mnt_resolve DIR        set MNT from -m's value or $MKTME_MNT, check it is a mount
#   mnt_command FILE CMD   one control command, one write; on rejection print the
#                          errno and the reason the sandbox logged to dmesg, return 1
#   redacted CMD           CMD with the values of key= and tweak= hidden, for messages
#   errno_of MESSAGE       "Required key not available" -> ENOKEY
#   die STATUS MESSAGE     print "TOOL: MESSAGE" to stderr and exit STATUS
# Exit statuses shared by the tools: 0 done, 1 rejected by the sandbox,
# 2 usage error or not a mount.

# shellcheck disable=SC2034  # used by the tools that source this file
EXIT_REJECTED=1
EXIT_USAGE=2

die() {
    local status=$1
    shift
    printf '%s: %s\n' "${TOOL:-mktme}" "$*" >&2
    exit "$status"
}

mnt_resolve() {
    local dir=${1:-${MKTME_MNT:-}}
    [ -n "$dir" ] || die "$EXIT_USAGE" "no mountpoint: give -m MNT or set MKTME_MNT (see --help)"
    if [ ! -d "$dir/keys" ] || [ ! -e "$dir/dram" ]; then
        die "$EXIT_USAGE" "$dir is not an mktme-sandbox mount (no keys/ or dram);" \
            "mount one with: mktme-sandbox mount DIR"
    fi
    MNT=$dir
}

errno_of() {
    case $1 in
        *"Invalid argument"*) echo EINVAL ;;
        *"Required key not available"*) echo ENOKEY ;;
        *"Device or resource busy"*) echo EBUSY ;;
        *"Resource temporarily unavailable"*) echo EAGAIN ;;
        *"Permission denied"*) echo EACCES ;;
        *"Operation not permitted"*) echo EPERM ;;
        *"Cannot allocate memory"*) echo ENOMEM ;;
        *"Input/output error"*) echo EIO ;;
        *"No such file or directory"*) echo ENOENT ;;
        *"File exists"*) echo EEXIST ;;
        *"Directory not empty"*) echo ENOTEMPTY ;;
        *) echo "error" ;;
    esac
}

# The last dmesg line "FILE: ERRNO: reason" (one per rejection; a refusal by the
# kernel's own permission check logs none).
dmesg_reason() {
    local tag="$1: $2" line last=""
    while IFS= read -r line; do
        [[ $line == *"$tag"* ]] && last=$line
    done <"$MNT/dmesg" || true
    printf '%s' "$last"
}

# CMD with every key=HEX and tweak=HEX shown as key=<redacted>: key material
# never appears in a message (SPEC 2), not even the user's own rejected key.
redacted() {
    local word words out=()
    read -ra words <<<"$1"
    for word in "${words[@]}"; do
        case $word in [kK][eE][yY]=* | [tT][wW][eE][aA][kK]=*) word="${word%%=*}=<redacted>" ;; esac
        out+=("$word")
    done
    printf '%s' "${out[*]}"
}

mnt_command() {
    local file=$1 cmd=$2 err name reason
    if err=$({ printf '%s\n' "$cmd" >"$MNT/$file"; } 2>&1); then
        return 0
    fi
    name=$(errno_of "$err")
    reason=$(dmesg_reason "$file" "$name")
    printf "%s: %s rejected '%s': %s (%s)%s\n" "${TOOL:-mktme}" "$file" "$(redacted "$cmd")" \
        "$name" "${err##*: }" "${reason:+: $reason}" >&2
    return 1
}

# Print the text of FILE in the mount, or fail like mnt_command does.
mnt_read() {
    local file=$1 err
    if ! err=$(cat -- "$MNT/$file" 2>&1); then
        printf '%s: cannot read %s: %s\n' "${TOOL:-mktme}" "$file" "${err##*: }" >&2
        return 1
    fi
    printf '%s\n' "$err"
}
