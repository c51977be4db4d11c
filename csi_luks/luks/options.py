"""Settings for formatting and opening LUKS2 volumes."""

from __future__ import annotations

from dataclasses import dataclass

# Why pbkdf2 with the minimum iteration count by default: every csi-luks passphrase is at least 256
# random bits, so guessing it is hopeless whatever the KDF costs. A KDF's work factor only defends
# low-entropy (human) passphrases. argon2's memory cost, meanwhile, is paid on every open: cryptsetup
# sizes it from the machine's RAM, up to 1 GiB per open, which OOM-kills a node plugin that opens many
# volumes at once (a node reboot with dozens of pods). pbkdf2 needs no memory and a fixed, tiny time.
# Operators who want argon2 anyway get it with a bounded memory cost (see MAX_ARGON2_MEMORY_KIB).
DEFAULT_PBKDF = "pbkdf2"
DEFAULT_PBKDF2_ITERATIONS = 1000  # cryptsetup's minimum for pbkdf2
DEFAULT_ARGON2_MEMORY_KIB = 32 * 1024
DEFAULT_ARGON2_ITERATIONS = 4
MAX_ARGON2_MEMORY_KIB = 1024 * 1024

PBKDFS = ("pbkdf2", "argon2i", "argon2id")
SECTOR_SIZES = (512, 1024, 2048, 4096)


@dataclass(frozen=True)
class FormatOptions:
    """How a new LUKS2 header is written (luksFormat)."""

    cipher: str = "aes-xts-plain64"
    key_size: int = 512  # bits; aes-xts splits it into two 256-bit keys
    hash: str = "sha256"
    pbkdf: str = DEFAULT_PBKDF
    pbkdf_iterations: int | None = None  # None: the pbkdf's default above
    pbkdf_memory_kib: int | None = None  # argon2 only; None: DEFAULT_ARGON2_MEMORY_KIB
    pbkdf_parallel: int = 1  # argon2 only; one thread per open keeps the node's CPUs for workloads
    sector_size: int | None = None  # None: cryptsetup picks (4096 where the device allows)
    label: str | None = None
    key_slot: int = 0

    def __post_init__(self) -> None:
        if self.pbkdf not in PBKDFS:
            raise ValueError(f"pbkdf must be one of {', '.join(PBKDFS)}, not {self.pbkdf!r}")
        if self.key_size <= 0 or self.key_size % 8:
            raise ValueError(f"key_size must be a positive multiple of 8 bits, not {self.key_size}")
        if self.pbkdf_iterations is not None and self.pbkdf_iterations < 1:
            raise ValueError("pbkdf_iterations must be at least 1")
        if self.pbkdf_memory_kib is not None:
            if self.pbkdf == "pbkdf2":
                raise ValueError("pbkdf_memory_kib applies to argon2 only")
            if not 32 <= self.pbkdf_memory_kib <= MAX_ARGON2_MEMORY_KIB:
                raise ValueError(f"pbkdf_memory_kib must be between 32 and {MAX_ARGON2_MEMORY_KIB}")
        if self.pbkdf_parallel < 1:
            raise ValueError("pbkdf_parallel must be at least 1")
        if self.sector_size is not None and self.sector_size not in SECTOR_SIZES:
            raise ValueError(f"sector_size must be one of {SECTOR_SIZES}, not {self.sector_size}")
        if self.label is not None and (len(self.label) > 47 or "\0" in self.label):
            raise ValueError("label must be at most 47 characters")  # LUKS2 header field size
        if not 0 <= self.key_slot <= 31:
            raise ValueError("key_slot must be between 0 and 31")

    def pbkdf_args(self) -> list[str]:
        """Explicit KDF cost flags: forced iterations also skip cryptsetup's per-run benchmark."""
        args = ["--pbkdf", self.pbkdf]
        if self.pbkdf == "pbkdf2":
            args += ["--pbkdf-force-iterations", str(self.pbkdf_iterations or DEFAULT_PBKDF2_ITERATIONS)]
        else:
            args += [
                "--pbkdf-force-iterations",
                str(self.pbkdf_iterations or DEFAULT_ARGON2_ITERATIONS),
                "--pbkdf-memory",
                str(self.pbkdf_memory_kib or DEFAULT_ARGON2_MEMORY_KIB),
                "--pbkdf-parallel",
                str(self.pbkdf_parallel),
            ]
        return args


@dataclass(frozen=True)
class OpenOptions:
    """How a LUKS device is mapped (luksOpen)."""

    allow_discards: bool = False  # TRIM through the mapping leaks which blocks are free; opt in
    # dm-crypt queues: bypassing the workqueues cuts latency on fast devices (Cloudflare's patches).
    no_read_workqueue: bool = False
    no_write_workqueue: bool = False
    same_cpu_crypt: bool = False
    submit_from_crypt_cpus: bool = False
    readonly: bool = False
    # Store the flags above (discard, perf) in the LUKS2 header, replacing those there: every later open
    # applies them without being told.
    persistent: bool = False

    def args(self) -> list[str]:
        flags = {
            "--allow-discards": self.allow_discards,
            "--perf-no_read_workqueue": self.no_read_workqueue,
            "--perf-no_write_workqueue": self.no_write_workqueue,
            "--perf-same_cpu_crypt": self.same_cpu_crypt,
            "--perf-submit_from_crypt_cpus": self.submit_from_crypt_cpus,
            "--readonly": self.readonly,
            "--persistent": self.persistent,
        }
        return [flag for flag, on in flags.items() if on]
