"""Checkpoint formats beyond transformers' native one.

- `phimm.formats.original`: the published Phi-4-multimodal checkpoint's original (remote-code) layout: key and
  config conversion, and a memory-lean loader (model built on `meta`, tensors assigned as views of the
  memory-mapped shards).
- `phimm.formats.check`: `check(path)` compares the safetensors headers with what config.json implies, before a
  long load (`python -m phimm.formats.check DIR`).
- `phimm.formats.random_ckpt`: random-weight checkpoints of any size in either layout, streamed shard by shard
  (`python -m phimm.formats.random_ckpt --layout original --size full --out DIR`), `shrink()` for miniatures, and
  `convert_original_to_hf()`.

The submodules are imported on use (`from phimm.formats import original`), so importing this package is cheap.
"""
