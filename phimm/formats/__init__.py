"""Checkpoint formats beyond transformers' native one.

- `phimm.formats.layout`: which layout a folder is in (`detect_layout()`), the `Loaded` result every loader
  returns, and what all layouts share (`phimm.json`, pickle refusal, adapter folders). The bottom of the
  import graph: `phimm.checkpoint` and every module below import it, it imports none of them.
- `phimm.formats.original_keys`: the published checkpoint's original (remote-code) layout on paper: one table of
  key renames (`RENAMES`) from which both directions are derived, `config.json` conversion, the LoRA specs and
  the tensors a config implies.
- `phimm.formats.shards`: `MappedShards`, safetensors tensors as views of memory maps (one per tensor, or one per
  file with `per_file=True` / `PHIMM_MMAP_PER_FILE=1`).
- `phimm.formats.empty`: the model built on the `meta` device (`build_empty()`), and its tied keys.
- `phimm.formats.placement`: spreading a loaded model over devices (`device_map=`).
- `phimm.formats.original`: the memory-lean loader of the original layout (model built on `meta`, tensors
  assigned as views of the memory-mapped shards); re-exports the names of `original_keys` and `shards`.
- `phimm.formats.check`: `check(path)` compares the safetensors headers with what config.json implies, before a
  long load (`python -m phimm.formats.check DIR`).
- `phimm.formats.random_ckpt`: random-weight checkpoints of any size in either layout, streamed shard by shard
  (`python -m phimm.formats.random_ckpt --layout original --size full --out DIR`), `shrink()` for miniatures, and
  `convert_original_to_hf()`.

Imports point one way: layout, empty, shards and placement import none of the others; original_keys imports
layout and empty; check imports those; original and random_ckpt import check and the rest. `phimm.checkpoint`
imports layout (and original, when it loads an original-layout checkpoint).
The submodules are imported on use (`from phimm.formats import original`), so importing this package is cheap.
"""
