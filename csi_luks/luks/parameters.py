"""The LUKS parameters a StorageClass chooses (Ceph-CSI's names where Ceph-CSI has them), checked once.

- `encryptionCipher`, `encryptionKeySize`, `encryptionSectorSize`: written into the LUKS2 header by the
  volume's first format and fixed from then on.
- `encryptionDiscard`, `encryptionPerfFlags`: dm-crypt activation flags, stored in the header as LUKS2
  persistent flags by the first open after the format (`cryptsetup open --persistent`), so every later
  open applies them without being told; `csi-luks luks-flags` changes them on an existing volume.

The controller checks a class against the combinations below (INVALID_ARGUMENT naming them); whether a
node's kernel can run the cipher is known only there, and luksFormat checks it before writing anything.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from csi_luks.luks.options import SECTOR_SIZES, FormatOptions, OpenOptions

PARAM_CIPHER = "encryptionCipher"
PARAM_KEY_SIZE = "encryptionKeySize"
PARAM_SECTOR_SIZE = "encryptionSectorSize"
PARAM_DISCARD = "encryptionDiscard"
PARAM_PERF_FLAGS = "encryptionPerfFlags"
PARAMETER_KEYS = (PARAM_CIPHER, PARAM_KEY_SIZE, PARAM_SECTOR_SIZE, PARAM_DISCARD, PARAM_PERF_FLAGS)

DEFAULT_CIPHER = FormatOptions.cipher
# Each cipher a class may ask for, with its key sizes in bits (the last is the default). XTS takes two
# keys (AES-128/256 pairs); Adiantum one 256-bit key.
CIPHERS: dict[str, tuple[int, ...]] = {
    "aes-xts-plain64": (256, 512),
    "serpent-xts-plain64": (256, 512),
    "twofish-xts-plain64": (256, 512),
    "aes-cbc-essiv:sha256": (128, 192, 256),
    "xchacha12,aes-adiantum-plain64": (256,),
    "xchacha20,aes-adiantum-plain64": (256,),
}
# dm-crypt performance flags, as cryptsetup's --perf-* options name them.
PERF_FLAGS = ("no_read_workqueue", "no_write_workqueue", "same_cpu_crypt", "submit_from_crypt_cpus")
# How the LUKS2 header's config.flags names each activation flag.
HEADER_FLAGS = {
    "discard": "allow-discards",
    "no_read_workqueue": "no-read-workqueue",
    "no_write_workqueue": "no-write-workqueue",
    "same_cpu_crypt": "same-cpu-crypt",
    "submit_from_crypt_cpus": "submit-from-crypt-cpus",
}


class LuksParameterError(ValueError):
    """A StorageClass asked for a cipher, key size, sector size or flag csi-luks does not offer."""


@dataclass(frozen=True)
class ActivationFlags:
    """dm-crypt flags a mapping is opened with: discard passes TRIM down; the perf flags bypass queues."""

    discard: bool = False
    perf_flags: tuple[str, ...] = ()  # in PERF_FLAGS order, no duplicates

    @property
    def any(self) -> bool:
        return self.discard or bool(self.perf_flags)

    def open_options(self, persistent: bool) -> OpenOptions:
        on = set(self.perf_flags)
        return OpenOptions(
            allow_discards=self.discard,
            no_read_workqueue="no_read_workqueue" in on,
            no_write_workqueue="no_write_workqueue" in on,
            same_cpu_crypt="same_cpu_crypt" in on,
            submit_from_crypt_cpus="submit_from_crypt_cpus" in on,
            persistent=persistent,
        )

    def header_names(self) -> list[str]:
        """The flags as luksDump and the header's config.flags name them."""
        return [HEADER_FLAGS[flag] for flag in (("discard",) if self.discard else ()) + self.perf_flags]

    @classmethod
    def from_header(cls, names: Iterable[str]) -> ActivationFlags:
        found = set(names)
        return cls(
            discard=HEADER_FLAGS["discard"] in found,
            perf_flags=tuple(flag for flag in PERF_FLAGS if HEADER_FLAGS[flag] in found),
        )

    def describe(self) -> str:
        return ", ".join(["discard"] * self.discard + list(self.perf_flags)) or "none"


def parse_perf_flags(value: str) -> tuple[str, ...]:
    """A comma-separated list of PERF_FLAGS ("" or "none" for none), in PERF_FLAGS order."""
    names = {name.strip() for name in value.split(",")} - {"", "none"}
    unknown = sorted(names - set(PERF_FLAGS))
    if unknown:
        raise LuksParameterError(
            f"{PARAM_PERF_FLAGS}: unknown flag(s) {', '.join(unknown)}; allowed: {', '.join(PERF_FLAGS)} "
            "(comma-separated)"
        )
    return tuple(flag for flag in PERF_FLAGS if flag in names)


def _bool(parameters: Mapping[str, str], key: str) -> bool:
    value = parameters.get(key, "")
    if value not in ("", "true", "false"):
        raise LuksParameterError(f'{key} must be "true" or "false", not {value!r}')
    return value == "true"


def _int(parameters: Mapping[str, str], key: str, allowed: tuple[int, ...], what: str) -> int | None:
    value = parameters.get(key, "")
    if value == "":
        return None
    if not value.isdigit() or int(value) not in allowed:
        raise LuksParameterError(
            f"{key} {value!r} is not offered{what}; allowed: {', '.join(map(str, allowed))}"
        )
    return int(value)


@dataclass(frozen=True)
class LuksParameters:
    """What a volume's class asked for; None: csi-luks's default (options.py)."""

    cipher: str | None = None
    key_size: int | None = None  # bits
    sector_size: int | None = None  # bytes
    flags: ActivationFlags = ActivationFlags()

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, str]) -> LuksParameters:
        """Checked StorageClass parameters; LuksParameterError naming the allowed values."""
        cipher = parameters.get(PARAM_CIPHER) or None
        if cipher is not None and cipher not in CIPHERS:
            raise LuksParameterError(
                f"{PARAM_CIPHER} {cipher!r} is not offered; allowed: {', '.join(CIPHERS)}"
            )
        sizes = CIPHERS[cipher or DEFAULT_CIPHER]
        key_size = _int(parameters, PARAM_KEY_SIZE, sizes, f" for cipher {cipher or DEFAULT_CIPHER}")
        sector_size = _int(parameters, PARAM_SECTOR_SIZE, SECTOR_SIZES, "")
        flags = ActivationFlags(
            discard=_bool(parameters, PARAM_DISCARD),
            perf_flags=parse_perf_flags(parameters.get(PARAM_PERF_FLAGS, "")),
        )
        return cls(cipher, key_size, sector_size, flags)

    @property
    def any(self) -> bool:
        return self != LuksParameters()

    @property
    def chooses_cipher(self) -> bool:
        """Whether the class chose the cipher's shape (cipher, key size or sector size)."""
        return (self.cipher, self.key_size, self.sector_size) != (None, None, None)

    def class_values(self) -> dict[str, str]:
        """These parameters as a StorageClass says them; only what differs from csi-luks's defaults."""
        values = {
            PARAM_CIPHER: self.cipher or "",
            PARAM_KEY_SIZE: str(self.key_size or ""),
            PARAM_SECTOR_SIZE: str(self.sector_size or ""),
            PARAM_DISCARD: "true" if self.flags.discard else "",
            PARAM_PERF_FLAGS: ",".join(self.flags.perf_flags),
        }
        return {key: value for key, value in values.items() if value}

    def format_options(self, label: str | None) -> FormatOptions:
        cipher = self.cipher or DEFAULT_CIPHER
        key_size = self.key_size or CIPHERS.get(cipher, (FormatOptions.key_size,))[-1]
        return FormatOptions(cipher=cipher, key_size=key_size, sector_size=self.sector_size, label=label)

    def describe(self) -> str:
        options = self.format_options(None)
        sector = f"{self.sector_size}-byte sectors" if self.sector_size else "cryptsetup's sector size"
        return f"{options.cipher}, {options.key_size}-bit key, {sector}, flags: {self.flags.describe()}"
