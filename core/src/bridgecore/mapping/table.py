"""The mapping table: which mapping owns a concrete Megatron name, and strict coverage."""

from __future__ import annotations

import fnmatch
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from bridgecore.errors import BridgeError
from bridgecore.mapping.pattern import bucket
from bridgecore.mapping.types import Mapping

_SHOWN = 8


@dataclass(frozen=True)
class Binding:
    """A concrete Megatron param (global name) bound to its mapping and HF tensor names."""

    megatron: str
    mapping: Mapping
    captures: tuple[tuple[str, int], ...]

    @property
    def capture_dict(self) -> dict[str, int]:
        return dict(self.captures)

    @property
    def hf(self) -> list[str]:
        return self.mapping.hf_names(self.capture_dict)


@dataclass
class Coverage:
    bindings: list[Binding]
    waived_hf: list[str]
    waived_megatron: list[str]


def _listing(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


class MappingTable:
    def __init__(self, mappings: Iterable[Mapping]):
        self.mappings = list(mappings)
        self._buckets: dict[str, list[Mapping]] = defaultdict(list)
        for m in self.mappings:
            self._buckets[m.megatron.bucket].append(m)

    def find(self, megatron_name: str) -> Binding | None:
        found = []
        for m in self._buckets.get(bucket(megatron_name), ()):
            captures = m.match(megatron_name)
            if captures is not None:
                found.append(Binding(megatron_name, m, tuple(sorted(captures.items()))))
        if len(found) > 1:
            raise BridgeError(
                f"Megatron param {megatron_name} matches {len(found)} mappings:"
                f" {', '.join(repr(b.mapping) for b in found)}"
            )
        return found[0] if found else None

    def cover(
        self,
        megatron_names: Iterable[str],
        hf_keys: Iterable[str] | None,
        allow_unmapped: Sequence[str] = (),
    ) -> Coverage:
        """Bind every Megatron name; with `hf_keys`, also check every HF tensor is used and exists.

        Offenders are all listed in one error, unless a glob in `allow_unmapped` waives them.
        """
        waived = lambda name: any(fnmatch.fnmatchcase(name, p) for p in allow_unmapped)  # noqa: E731
        bindings, unmapped, waived_megatron = [], [], []
        for name in megatron_names:
            b = self.find(name)
            if b is not None:
                bindings.append(b)
            elif waived(name):
                waived_megatron.append(name)
            else:
                unmapped.append(name)
        if unmapped:
            raise BridgeError(
                f"{len(unmapped)} Megatron params have no mapping: {_listing(unmapped)}"
                " (waive with --allow-unmapped PATTERN)"
            )
        if hf_keys is None:
            return Coverage(bindings, [], waived_megatron)
        keys = set(hf_keys)
        used = {n for b in bindings for n in b.hf}
        missing = sorted(n for n in used if n not in keys)
        if missing:
            raise BridgeError(f"checkpoint lacks {len(missing)} tensors the mappings need: {_listing(missing)}")
        extra = sorted(k for k in keys - used)
        waived_hf = [k for k in extra if waived(k)]
        extra = [k for k in extra if not waived(k)]
        if extra:
            raise BridgeError(
                f"{len(extra)} checkpoint tensors are not mapped: {_listing(extra)}"
                " (waive with --allow-unmapped PATTERN)"
            )
        return Coverage(bindings, waived_hf, waived_megatron)
