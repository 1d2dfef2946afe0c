"""Check a checkpoint before a long load: read only the safetensors headers (a few KB per shard) and compare them
with what `config.json` implies (the model built on the `meta` device: every state-dict key and shape, plus the
LoRA tensors at the configured ranks). A truncated download, a shard from another model or a LoRA of the wrong
rank is reported by name, in seconds, before 11 GB are read.

    python -m phimm.formats.check DIR      # prints the report; exit status 1 when something does not fit

`check(path)` returns a `CheckReport`, or raises `phimm.errors.CheckpointError` listing the problems.
Both layouts are understood: the original (remote-code) one and transformers' native one (with its peft
`<name>-lora/` folders; phimm's own layout is the native one plus `phimm.json`).
"""

from __future__ import annotations

import json
import math
import struct
import sys
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from . import original_keys
from .empty import build_empty, tied_keys
from .layout import PHIMM_FILE, adapter_folders, detect_layout

INDEX_FILE = "model.safetensors.index.json"
_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
             "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_MAX_HEADER = 100 * 1024 * 1024
_SHOW = 12  # problems listed per kind in an error message


@dataclass
class TensorInfo:
    """One tensor as a safetensors header describes it; `start` is the absolute byte offset in `file`."""

    key: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    nbytes: int


def read_header(file: str | Path) -> tuple[dict[str, TensorInfo], dict[str, str], list[str]]:
    """(key -> TensorInfo, the header's `__metadata__`, problems) of one safetensors file; reads the header
    only. Problems: a file too short for its header (a truncated download), inconsistent offsets."""
    file = Path(file)
    problems: list[str] = []
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return {}, {}, [f"{file.name}: {size} bytes: not a safetensors file (empty or truncated)"]
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            return {}, {}, [f"{file.name}: header length {n} does not fit the file's {size} bytes: not a "
                            "safetensors file, or truncated"]
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return {}, {}, [f"{file.name}: unreadable safetensors header: {e}"]
    if not isinstance(header, dict):
        return {}, {}, [f"{file.name}: the safetensors header is not a JSON object"]
    meta = header.pop("__metadata__", None) or {}
    base = 8 + n
    out: dict[str, TensorInfo] = {}
    end_max = 0
    for key, entry in header.items():
        try:
            dtype, shape, (s, e) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            problems.append(f"{file.name}: malformed header entry for {key}")
            continue
        want = math.prod(shape) * _ITEMSIZE.get(dtype, 0)
        if dtype in _ITEMSIZE and e - s != want:
            problems.append(f"{file.name}: {key} {dtype}{list(shape)} needs {want} bytes, its offsets span {e - s}")
        out[key] = TensorInfo(key, file, dtype, shape, base + int(s), int(e) - int(s))
        end_max = max(end_max, int(e))
    if base + end_max > size:
        cut = sorted(k for k, t in out.items() if t.start + t.nbytes > size)
        problems.append(f"{file.name}: the file has {size} bytes but its header needs {base + end_max}: a "
                        f"truncated download ({len(cut)} tensor(s) cut off, e.g. {cut[:3]})")
    return out, meta, problems


def list_tensors(folder: str | Path) -> tuple[dict[str, TensorInfo], list[str], list[str]]:
    """(key -> TensorInfo, problems, warnings) over the checkpoint's shards: those the index names when there is
    one (checking the index against the files), else every top-level `*.safetensors`."""
    folder = Path(folder)
    problems: list[str] = []
    warnings: list[str] = []
    index_file = folder / INDEX_FILE
    weight_map: dict[str, str] | None = None
    if index_file.is_file():
        try:
            index = json.loads(index_file.read_text())
            weight_map = dict(index["weight_map"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            problems.append(f"{INDEX_FILE}: unreadable: {e}")
            index = {}
    if weight_map is not None:
        files = sorted(set(weight_map.values()))
        extra = sorted(p.name for p in folder.glob("*.safetensors") if p.name not in files)
        if extra:
            warnings.append(f"{INDEX_FILE} does not name {extra}: ignored")
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        problems.append("no *.safetensors files")
    tensors: dict[str, TensorInfo] = {}
    for name in files:
        f = folder / name
        if not f.is_file():
            n = sum(1 for v in (weight_map or {}).values() if v == name)
            problems.append(f"{name}: missing ({INDEX_FILE} puts {n} tensors in it): an incomplete download?")
            continue
        infos, _, probs = read_header(f)
        problems.extend(probs)
        for key, info in infos.items():
            if key in tensors:
                problems.append(f"{key} is in both {tensors[key].file.name} and {name}")
            tensors[key] = info
    if weight_map is not None:
        present_files = {n for n in files if (folder / n).is_file()}
        for key, name in weight_map.items():
            if name in present_files and key in tensors and tensors[key].file.name != name:
                problems.append(f"{INDEX_FILE} puts {key} in {name} but it is in {tensors[key].file.name}")
        for key in sorted(set(tensors) - set(weight_map)):
            warnings.append(f"{key} ({tensors[key].file.name}) is not in {INDEX_FILE}")
        total = (index.get("metadata") or {}).get("total_size")
        held = sum(t.nbytes for t in tensors.values())
        if total is not None and int(total) != held and not problems:
            warnings.append(f"{INDEX_FILE} says total_size {total} but the shards hold {held} bytes of tensors")
    return tensors, problems, warnings


@dataclass
class CheckReport:
    """What `check()` found. `ok` is False when the checkpoint cannot be loaded as it is."""

    path: Path
    layout: str
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    expected: Any = None  # phimm.formats.original_keys.ExpectedTensors for the original layout
    expected_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    missing: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)
    unexpected: list[tuple[str, tuple[int, ...], str]] = field(default_factory=list)  # key, shape, file
    wrong_shape: list[tuple[str, tuple[int, ...], tuple[int, ...], str]] = field(default_factory=list)  # got, want
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    hints: list[str] = field(default_factory=list)
    adapters: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {r, alpha, tensors, bytes}

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.wrong_shape or self.problems)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def dtypes(self) -> Counter:
        return Counter(t.dtype for t in self.tensors.values())

    @property
    def shards(self) -> list[str]:
        return sorted({t.file.name for t in self.tensors.values()})

    def problem_lines(self, limit: int = _SHOW) -> list[str]:
        lines = []
        for kind, items in (("missing", self.missing), ("unexpected", self.unexpected),
                            ("wrong shape", self.wrong_shape), ("problem", self.problems)):
            for item in items[:limit]:
                if kind == "missing":
                    lines.append(f"  missing: {item[0]} {list(item[1])}")
                elif kind == "unexpected":
                    lines.append(f"  unexpected: {item[0]} {list(item[1])} (in {item[2]})")
                elif kind == "wrong shape":
                    lines.append(f"  wrong shape: {item[0]} is {list(item[1])} in {item[3]}, config.json implies "
                                 f"{list(item[2])}")
                else:
                    lines.append(f"  {item}")
            if len(items) > limit:
                lines.append(f"  ... and {len(items) - limit} more {kind}")
        return lines

    def summary(self) -> str:
        gb = self.total_bytes / 1e9
        dts = ", ".join(f"{n} {d}" for d, n in sorted(self.dtypes.items()))
        head = (f"{self.path}: {self.layout} layout, {len(self.tensors)} tensors ({dts}), {gb:.3f} GB in "
                f"{len(self.shards)} shard(s)")
        lines = [head]
        for name, a in sorted(self.adapters.items()):
            lines.append(f"  adapter {name}: r={a['r']} alpha={a['alpha']}, {a['tensors']} tensors, "
                         f"{a['bytes'] / 1e6:.1f} MB")
        if self.ok:
            lines.append(f"  OK: every tensor config.json implies is there, with its shape "
                         f"({len(self.expected_shapes)} expected)")
        else:
            lines.append(f"  does NOT match config.json ({len(self.expected_shapes)} tensors expected):")
            lines += self.problem_lines()
            lines += [f"  hint: {h}" for h in self.hints]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    __str__ = summary

    def raise_for_problems(self) -> None:
        if self.ok:
            return
        lines = self.problem_lines() + [f"  hint: {h}" for h in self.hints]
        n = len(self.missing) + len(self.unexpected) + len(self.wrong_shape) + len(self.problems)
        raise CheckpointError(f"{self.path}: the weights do not match config.json ({n} problem(s); "
                              f"{self.layout} layout):\n" + "\n".join(lines))


def check(path: str | Path, *, model=None, raise_on_error: bool = True) -> CheckReport:
    """Compare the checkpoint's safetensors headers with its `config.json`; `model`: the model already built on
    `meta` from that config (to avoid building it twice). Raises `CheckpointError` unless `raise_on_error` is
    False (then look at `report.ok`)."""
    path = Path(path)
    layout = detect_layout(path)
    report = CheckReport(path, layout)
    report.tensors, report.problems, report.warnings = list_tensors(path)
    if layout == "original":
        _compare_original(report, model)
    else:
        _compare_native(report, model)
    if raise_on_error:
        report.raise_for_problems()
    return report


def _compare(report: CheckReport, expected: Mapping[str, tuple[int, ...]], present: Mapping[str, TensorInfo]):
    for key, shape in expected.items():
        info = present.get(key)
        if info is None:
            report.missing.append((key, tuple(shape)))
        elif tuple(info.shape) != tuple(shape):
            report.wrong_shape.append((key, tuple(info.shape), tuple(shape), info.file.name))
    for key, info in present.items():
        if key not in expected:
            report.unexpected.append((key, tuple(info.shape), info.file.name))


def _compare_original(report: CheckReport, model) -> None:
    cfg = original_keys.read_original_config(report.path)
    try:
        exp = original_keys.expected_tensors(cfg, model)
    except CheckpointError:
        raise
    except Exception as e:  # a config transformers cannot build a model from
        raise CheckpointError(f"{report.path}/config.json: cannot build the model it describes: {e}") from e
    report.expected = exp
    report.expected_shapes = dict(exp.shapes)
    _compare(report, exp.shapes, report.tensors)
    for name, spec in exp.lora.items():
        keys = [k for k in report.tensors if (s := original_keys.split_lora_key(k)) and s[2] == name]
        report.adapters[name] = {"r": spec.r, "alpha": spec.alpha, "tensors": len(keys),
                                 "bytes": sum(report.tensors[k].nbytes for k in keys)}
    _hints(report, lora={n: s.r for n, s in exp.lora.items()})
    # peft folders shipped next to the shards (the published repo has them): headers against the ranks
    for name, spec in exp.lora.items():
        folder = report.path / f"{name}-lora"
        if (folder / "adapter_config.json").is_file():
            _compare_peft_folder(report, folder, name, {p: _lin_shape(exp, p) for p in exp.targets[name]},
                                 spec.r, spec.alpha)


def _lin_shape(exp, path: str) -> tuple[int, int]:
    """(out, in) of a LoRA target, from its base weight's expected shape."""
    shape = exp.shapes[f"{path}.base_layer.weight"]
    return int(shape[0]), int(shape[1])


def _compare_native(report: CheckReport, model) -> None:
    from transformers import Phi4MultimodalConfig

    try:
        cfg = Phi4MultimodalConfig.from_pretrained(str(report.path))
    except Exception as e:
        raise CheckpointError(f"{report.path}/config.json: not a Phi-4-multimodal config: {e}") from e
    if model is None:
        model = build_empty(cfg)
    tied = set(tied_keys(model))
    expected = {k: tuple(t.shape) for k, t in model.state_dict().items() if k not in tied}
    report.expected_shapes = expected
    _compare(report, expected, report.tensors)
    _hints(report, lora={})
    meta = {}
    if (report.path / PHIMM_FILE).is_file():
        meta = json.loads((report.path / PHIMM_FILE).read_text())
    linears = {n: (m.out_features, m.in_features) for n, m in model.named_modules()
               if hasattr(m, "in_features") and hasattr(m, "out_features")}
    for name, folder in adapter_folders(report.path, meta).items():
        try:
            acfg = json.loads((folder / "adapter_config.json").read_text())
            r = int(acfg["r"])
        except (OSError, KeyError, ValueError) as e:
            report.problems.append(f"{folder.name}/adapter_config.json: unreadable: {e}")
            continue
        _compare_peft_folder(report, folder, name, linears, r, float(acfg.get("lora_alpha", r)), any_target=True)


def _compare_peft_folder(report: CheckReport, folder: Path, name: str, targets: Mapping[str, tuple[int, int]],
                         r: int, alpha: float, any_target: bool = False) -> None:
    """A peft folder's header: every `lora_A` [r, in] / `lora_B` [out, r] of a known target. `any_target`:
    the folder chooses its targets (native layout), else it must cover exactly `targets`."""
    f = folder / "adapter_model.safetensors"
    if not f.is_file():
        if any_target:  # the native layout's adapters live there
            report.problems.append(f"{folder.name}: no adapter_model.safetensors")
        else:  # the original layout's LoRAs are in the shards; the folder is an extra copy
            report.warnings.append(f"{folder.name}: no adapter_model.safetensors: not compared with the shards")
        return
    try:
        acfg = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        report.problems.append(f"{folder.name}/adapter_config.json: unreadable: {e}")
        return
    if int(acfg.get("r", r)) != r or abs(float(acfg.get("lora_alpha", alpha)) - alpha) > 1e-6:
        report.problems.append(f"{folder.name}/adapter_config.json: r={acfg.get('r')} lora_alpha="
                               f"{acfg.get('lora_alpha')}, but config.json's {name}_lora says r={r} alpha={alpha}")
    infos, _, probs = read_header(f)
    report.problems.extend(f"{folder.name}/{p}" for p in probs)
    prefix = "base_model.model."
    seen: set[tuple[str, str]] = set()
    for key, info in infos.items():
        inner = key[len(prefix):] if key.startswith(prefix) else key
        path, sep, rest = inner.partition(".lora_")
        ab = rest[:1]
        if not sep or ab not in "AB" or not rest.endswith("weight"):
            report.unexpected.append((f"{folder.name}/{key}", tuple(info.shape), f.name))
            continue
        if path not in targets:
            report.unexpected.append((f"{folder.name}/{key}", tuple(info.shape), f"{f.name}: not a LoRA target"))
            continue
        out_f, in_f = targets[path]
        want = (r, in_f) if ab == "A" else (out_f, r)
        seen.add((path, ab))
        if tuple(info.shape) != want:
            report.wrong_shape.append((f"{folder.name}/{key}", tuple(info.shape), want, f.name))
    if not any_target:
        for path in targets:
            for ab in "AB":
                if (path, ab) not in seen:
                    report.missing.append((f"{folder.name}/{prefix}{path}.lora_{ab}.weight",
                                           (r, targets[path][1]) if ab == "A" else (targets[path][0], r)))
    if name not in report.adapters:
        report.adapters[name] = {"r": r, "alpha": alpha, "tensors": len(infos),
                                 "bytes": sum(i.nbytes for i in infos.values())}


def _hints(report: CheckReport, lora: Mapping[str, int]) -> None:
    """Likely causes, from the pattern of what does not fit."""
    if report.layout == "original":
        native_names = [k for k, *_ in report.unexpected
                        if "global_img_feature_extensor" in k or "img_projection_up" in k or "gate_up_proj.weight" in k]
        if native_names:
            report.hints.append("the shards hold transformers-native names (e.g. "
                                f"{native_names[0]}) but config.json is the original (remote-code) one")
    else:
        orig = [k for k, *_ in report.unexpected if ".base_layer." in k or ".lora_A." in k or "glb_GN" in k]
        if orig:
            report.hints.append(f"the shards hold original (remote-code) names (e.g. {orig[0]}) but config.json "
                                "is transformers-native")
    ranks: dict[str, set[int]] = {}
    for key, got, want, _ in report.wrong_shape:
        if ".lora_A." in key:
            name = key.split(".lora_A.", 1)[1].split(".")[0] if report.layout == "original" else key.split("/")[0]
            ranks.setdefault(name, set()).add(got[0])
    for name, found in ranks.items():
        want = lora.get(name)
        report.hints.append(f"LoRA {name!r} has rank {sorted(found)} in the files"
                            + (f" but config.json says r={want}" if want else "")
                            + ": a LoRA of another rank, or the wrong config")
    missing_shapes = [s for _, s in report.missing]
    if report.missing and not report.unexpected and len(report.missing) > 10:
        report.hints.append(f"{len(report.missing)} tensors are missing and none unexpected: a shard is missing or "
                            "was cut short (an incomplete download?)")
    if report.wrong_shape and len(report.wrong_shape) > 10 and not missing_shapes:
        report.hints.append("many shapes differ: these shards may be of another model size than config.json")


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m phimm.formats.check",
                                 description="Check a Phi-4-multimodal checkpoint's files against its config.json "
                                             "(reads headers only) before a long load.")
    ap.add_argument("path", help="checkpoint folder (original or transformers-native layout)")
    args = ap.parse_args(argv)
    try:
        report = check(args.path, raise_on_error=False)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
