"""The continuous-batching engine: row equality under staggered load on every route, rows joining and leaving,
limits (running rows, KV budget, queue), cancellation, failures confined to their rows, and the cache layout."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

import phimm
from conftest import make_audio, make_image
from phimm.cache import BatchCache, PreallocatedCache
from phimm.engine import EngineLimits
from phimm.errors import ContextLengthError, PlaceholderError, QueueFullError


def _requests():
    img, img2, aud, aud2 = make_image(0), make_image(1, size=(500, 260)), make_audio(0), make_audio(1, seconds=1.7)
    return [
        phimm.Request(prompt="hello world what color"),
        phimm.Request(prompt="<|image|>what color is the circle", images=[img]),
        phimm.Request(prompt="<|audio|>transcribe the audio clip", audios=[aud]),
        phimm.Request(prompt="<|image|><|audio|>answer the spoken question", images=[img2], audios=[aud2]),
        phimm.Request(prompt="the red square and the blue star are here"),
        phimm.Request(prompt="<|image|>how many shapes", images=[img2]),
        phimm.Request(prompt="<|audio|>zero one two", audios=[aud2]),
        phimm.Request(prompt="<|image|><|audio|>what", images=[img], audios=[aud]),
    ]


@pytest.fixture(scope="module")
def pipe(tiny_ckpt):
    p = phimm.load(tiny_ckpt, dtype="float32", threads=1)
    yield p
    p.close()


def test_staggered_rows_equal_alone_on_every_route(pipe):
    reqs = _requests()
    budgets = [3 + (i % 5) * 2 for i in range(len(reqs) * 2)]  # rows finish at different steps
    alone = [pipe(reqs[i % len(reqs)], max_new_tokens=n, output_logits=True) for i, n in enumerate(budgets)]
    assert {str(o.route) for o in alone} == {"none", "vision", "speech", "vision+vision_speech"}
    futures = []
    for i, n in enumerate(budgets):  # arrivals staggered: rows join a batch that is already decoding
        futures.append(pipe.submit(reqs[i % len(reqs)], max_new_tokens=n, output_logits=True))
        time.sleep(0.002 * (i % 3))
    for ref, fut in zip(alone, futures):
        got = fut.result(timeout=120)
        assert got.route == ref.route
        assert got.token_ids == ref.token_ids
        assert (got.logits[0] - ref.logits[0]).abs().max().item() < 1e-5  # first step's logits
        assert (got.logits - ref.logits).abs().max().item() < 1e-4
    stats = pipe.engine.stats()
    assert stats["running"] == 0 and stats["kv_positions"] == 0  # every row left and freed its cache


def test_rows_share_decode_steps(pipe):
    reqs = _requests()[:4]
    before = pipe.engine.stats()["steps"]
    outs = pipe(reqs, max_new_tokens=6, min_new_tokens=6)
    steps = pipe.engine.stats()["steps"] - before
    assert all(len(o.token_ids) == 6 for o in outs)
    assert steps == 5  # 4 rows x 5 decode tokens each in 5 shared forwards (the first token comes from prefill)


def test_limits_running_rows_and_kv_budget(tiny_ckpt):
    reqs = _requests()
    n = len(phimm.load(tiny_ckpt).prepare(reqs[3])[0].input_ids)
    limits = EngineLimits(max_running=3, kv_budget_tokens=2 * (n + 4) + 1)  # 2 rows of reqs[3] fit, not 3
    p = phimm.load(tiny_ckpt, limits=limits)
    reqs = [reqs[3]] * 5
    seen = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            s = p.engine.stats()
            seen.append((s["running"], s["kv_positions"]))
            time.sleep(0.001)

    t = threading.Thread(target=watch)
    t.start()
    try:
        outs = p(reqs, max_new_tokens=4)
    finally:
        stop.set()
        t.join()
    assert all(o.ok and len(o.token_ids) >= 1 for o in outs)  # the ones that did not fit waited, none failed
    assert max(r for r, _ in seen) == 2  # the budget, not max_running, held the third row back
    assert max(k for _, k in seen) <= limits.kv_budget_tokens
    assert len({tuple(o.token_ids) for o in outs}) == 1  # and waiting changed no answer
    with pytest.raises(ContextLengthError, match="KV-cache budget"):
        p(reqs[3], max_new_tokens=limits.kv_budget_tokens)
    p.close()


def test_context_length_and_queue_limits(tiny_ckpt):
    p = phimm.load(tiny_ckpt, limits=EngineLimits(max_running=1, max_waiting=2))
    with pytest.raises(ContextLengthError, match="context"):
        p("hello " * 5000, max_new_tokens=2)
    futures = [p.submit("hello world", max_new_tokens=40, min_new_tokens=40) for _ in range(2)]
    refused = 0
    for _ in range(6):  # the queue holds 2 waiting requests: the rest are refused at once, not crashed
        try:
            futures.append(p.submit("hello world", max_new_tokens=40, min_new_tokens=40))
        except QueueFullError as e:
            assert "queue is full" in str(e)
            refused += 1
    assert refused >= 3
    assert all(len(f.result(timeout=120).token_ids) == 40 for f in futures)
    p.close()


def test_cancel_frees_the_row_and_others_finish(pipe):
    reqs = _requests()
    long = pipe.open(reqs[1], max_new_tokens=200, min_new_tokens=200)
    other = pipe.submit(reqs[2], max_new_tokens=8)
    deltas = iter(long)
    next(deltas)
    long.cancel()
    out = long.result(timeout=60)
    assert out.finish_reason == "cancelled" and len(out.token_ids) < 200
    assert other.result(timeout=60).ok
    time.sleep(0.05)
    assert pipe.engine.stats()["running"] == 0


def test_a_failing_row_does_not_take_the_batch_down(pipe):
    reqs = _requests()
    prepared, route = pipe.prepare(reqs[1])
    ids = list(prepared.input_ids)
    ids.remove(pipe.model.image_token_id)  # one placeholder fewer than the image's features
    prepared.input_ids = ids
    opts = pipe.generation.__class__.from_kwargs(pipe.generation, max_new_tokens=4)
    good = [pipe.submit(r, max_new_tokens=4) for r in reqs[:4]]
    bad = pipe.engine.submit(prepared, route, opts)
    out = bad.result(timeout=60)
    assert isinstance(out.error, PlaceholderError) and out.finish_reason == "error" and out.text == ""
    assert all(f.result(timeout=60).ok for f in good)
    assert pipe(reqs[0], max_new_tokens=2).ok  # and the engine serves on


def test_stream_carries_route_and_output(pipe):
    req = _requests()[3]
    ref = pipe(req, max_new_tokens=6)
    stream = pipe.stream(req, max_new_tokens=6)
    assert str(stream.route) == "vision+vision_speech"  # known before the first piece
    text = "".join(stream)
    assert stream.output is not None and stream.output.token_ids == ref.token_ids
    assert text == ref.text == stream.output.text


def test_async_generate_shares_the_engine(pipe):
    reqs = _requests()

    async def main():
        return await asyncio.gather(*(pipe.generate(r, max_new_tokens=5) for r in reqs))

    outs = asyncio.run(main())
    for r, o in zip(reqs, outs):
        assert o.token_ids == pipe(r, max_new_tokens=5).token_ids


def test_stop_strings_end_the_answer(embedded_pipe):
    req = phimm.Request(messages=[{"role": "user", "content": [
        {"type": "audio", "audio": "demo/examples/digits_four_seven_one_nine.wav"},
        {"type": "text", "text": "Transcribe the audio clip into text."}]}])
    full = embedded_pipe(req, max_new_tokens=12)
    assert full.text == "four seven one nine"
    cut = embedded_pipe(req, max_new_tokens=12, stop_strings=["ne", "xyz"])  # "ne" ends inside "one"
    assert cut.finish_reason == "stop" and cut.text == "four seven o"
    pieces = list(embedded_pipe.stream(req, max_new_tokens=12, stop_strings=["ne"]))
    assert "".join(pieces) == "four seven o"  # a stream never shows text past the stop


@pytest.fixture(scope="module")
def embedded_pipe():
    p = phimm.load(threads=1)
    yield p
    p.close()


def test_batch_cache_joins_and_leaves_right_aligned():
    """The running batch's cache: rows right-aligned to one edge, zeros to their left; joins and leaves that fit
    the buffers move only the rows concerned (the same buffers), the others lay them out anew."""
    torch.manual_seed(0)
    H, D = 2, 4

    def prefilled(n_rows, T):
        c = PreallocatedCache(1, T)
        c.layers[0].update(torch.randn(n_rows, H, T, D), torch.randn(n_rows, H, T, D))
        return c

    def buffer(batch):
        return batch.layers[0].key_buf.data_ptr()

    a, b = prefilled(1, 5), prefilled(2, 3)
    batch = BatchCache(1, max_rows=16)
    batch.add_rows([(a, 0, 0, 5)])
    batch.add_rows([(b, 0, 0, 3), (b, 1, 0, 3)])  # more rows than the buffers have: new ones, with spare rows
    assert batch.lengths == [5, 3, 3] and batch.width == 5 and batch.layers[0].key_buf.shape[0] > 3
    keys = batch.layers[0].keys
    assert keys.shape[0] == 3
    assert torch.equal(keys[0], a.layers[0].keys[0])
    assert torch.equal(keys[1, :, 2:], b.layers[0].keys[0]) and keys[1, :, :2].abs().sum() == 0
    mask = batch.attention_mask(1)
    assert mask.tolist() == [[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]]
    assert batch.next_positions().flatten().tolist() == [5, 3, 3]
    new = torch.randn(3, H, 1, D)
    batch.layers[0].update(new, new)
    batch.advance()
    assert batch.width == 6 and torch.equal(batch.layers[0].keys[:, :, 5], new[:, :, 0])
    ptr = buffer(batch)
    batch.keep_rows([2, 1])  # the longest row leaves: the rows move up in place, the width stays
    assert batch.lengths == [4, 4] and batch.width == 6 and buffer(batch) == ptr
    keys = batch.layers[0].keys
    assert torch.equal(keys[0, :, 2:5], b.layers[0].keys[1]) and torch.equal(keys[0, :, 5], new[2, :, 0])
    assert torch.equal(keys[1, :, 2:5], b.layers[0].keys[0]) and torch.equal(keys[1, :, 5], new[1, :, 0])
    assert keys[:, :, :2].abs().sum() == 0
    assert batch.attention_mask(1).tolist() == [[0, 0, 1, 1, 1, 1, 1]] * 2
    short = prefilled(1, 2)
    batch.add_rows([(short, 0, 0, 2)])  # into the spare row the leaving row used: its old columns cleared
    assert batch.lengths == [4, 4, 2] and buffer(batch) == ptr
    assert torch.equal(batch.layers[0].keys[2, :, 4:], short.layers[0].keys[0])
    assert batch.layers[0].keys[2, :, :4].abs().sum() == 0
    assert torch.equal(batch.layers[0].values[2, :, 4:], short.layers[0].values[0])
    longer = prefilled(1, 9)
    batch.add_rows([(longer, 0, 0, 9)])  # a longer row joins: new buffers, the others shift right
    assert batch.width == 9 and buffer(batch) != ptr
    assert torch.equal(batch.layers[0].keys[0, :, 5:8], b.layers[0].keys[1])
    assert torch.equal(batch.layers[0].keys[3], longer.layers[0].keys[0])
    very_long = prefilled(1, 80)
    batch.add_rows([(very_long, 0, 0, 80)])
    ptr = buffer(batch)
    batch.keep_rows([0, 2])  # most of the width unused: cut off (new buffers)
    assert batch.lengths == [4, 2] and batch.width == 4 and buffer(batch) != ptr
    assert torch.equal(batch.layers[0].keys[0, :, :3], b.layers[0].keys[1])
    assert torch.equal(batch.layers[0].keys[1, :, 2:], short.layers[0].keys[0])
    batch.keep_rows([])
    assert batch.rows == 0 and batch.positions == 0
    # an empty batch holds no memory: its buffers are new, not views of the old ones
    assert batch.layers[0].key_buf.untyped_storage().nbytes() == 0
    assert batch.layers[0].value_buf.untyped_storage().nbytes() == 0


def test_batch_cache_spare_rows_stay_within_limits():
    """Spare rows never take the buffers past the engine's row limit or its KV budget; a batch that starts
    all at once (a static batch) gets none."""
    H, D = 2, 4
    src = PreallocatedCache(1, 40)
    src.layers[0].update(torch.randn(8, H, 40, D), torch.randn(8, H, 40, D))
    static = BatchCache(1, max_rows=16)
    static.add_rows([(src, j, 0, 40) for j in range(8)])
    assert static.layers[0].key_buf.shape[0] == 8
    capped = BatchCache(1, max_rows=5)
    capped.add_rows([(src, 0, 0, 40)])
    capped.add_rows([(src, 1, 0, 40)])
    assert capped.layers[0].key_buf.shape[0] == 5
    tight = BatchCache(1, max_rows=16, budget=3 * 72)  # 3 rows of 40 + GROW columns
    tight.add_rows([(src, 0, 0, 40)])
    tight.add_rows([(src, 1, 0, 40)])
    assert tight.layers[0].key_buf.shape[0] == 3


def test_mixed_step_cache_layout_and_undo():
    """A mixed step's cache (`phimm.step.MixedStep`): the running rows' new column and each joining row's prompt
    land right-aligned at one edge; an aborted step leaves the batch's cache exactly as it was."""
    from phimm.step import MixedStep

    torch.manual_seed(0)
    H, D = 2, 4
    src = PreallocatedCache(1, 3)
    src.layers[0].update(torch.randn(2, H, 3, D), torch.randn(2, H, 3, D))
    batch = BatchCache(1)
    batch.add_rows([(src, 0, 0, 3), (src, 1, 1, 2)])  # lengths 3 and 2
    before_k = batch.layers[0].keys.clone()
    step = MixedStep(batch, [5])  # a joining row longer than the batch: everything shifts right
    assert step.width == 5 and step.tokens == 2 + 5 and step.last_tokens() == [0, 1, 6]
    assert step.positions().flatten().tolist() == [3, 2, 0, 1, 2, 3, 4]
    assert step.decode_mask("cpu")[:, 0, 0].tolist() == [[False, True, True, True, True],
                                                         [False, False, True, True, True]]
    step.abort()
    assert batch.lengths == [3, 2] and torch.equal(batch.layers[0].keys, before_k)

    step = MixedStep(batch, [5])
    k = torch.randn(7, H, 1, D)
    step.write(0, k, -k)
    step.finish()
    assert batch.lengths == [4, 3, 5] and batch.width == 5
    keys, values = batch.layers[0].keys, batch.layers[0].values
    assert torch.equal(keys[0, :, 1:4], before_k[0]) and torch.equal(keys[1, :, 2:4], before_k[1, :, 1:])
    assert torch.equal(keys[:2, :, 4], k[:2, :, 0]) and torch.equal(values[:2, :, 4], -k[:2, :, 0])
    assert torch.equal(keys[2], k[2:, :, 0].transpose(0, 1))
    assert keys[0, :, 0].abs().sum() == 0 and keys[1, :, :2].abs().sum() == 0

    # a joining row no longer than the batch's next column goes into a spare row of the same buffers
    ptr, before_k = batch.layers[0].key_buf.data_ptr(), batch.layers[0].keys.clone()
    batch.layers[0].key_buf[3:].fill_(7.0)  # whatever a row that left there wrote
    step = MixedStep(batch, [2])
    assert step.width == 6 and batch.layers[0].key_buf.data_ptr() == ptr
    step.abort()
    assert batch.lengths == [4, 3, 5] and torch.equal(batch.layers[0].keys, before_k)
    step = MixedStep(batch, [2])
    k = torch.randn(5, H, 1, D)
    step.write(0, k, -k)
    step.finish()
    assert batch.lengths == [5, 4, 6, 2] and batch.width == 6 and batch.layers[0].key_buf.data_ptr() == ptr
    keys = batch.layers[0].keys
    assert torch.equal(keys[:3, :, :5], before_k) and torch.equal(keys[:3, :, 5], k[:3, :, 0])
    assert torch.equal(keys[3, :, 4:], k[3:, :, 0].transpose(0, 1)) and keys[3, :, :4].abs().sum() == 0
    assert batch.attention_mask(1)[3].tolist() == [0, 0, 0, 0, 1, 1, 1]


def _running(pipe, req, n):
    """A stream of `n` tokens that has started decoding (its first piece is out)."""
    stream = pipe.open(req, max_new_tokens=n, min_new_tokens=n, output_logits=True)
    pieces = iter(stream)
    next(pieces)
    return stream


def test_arrivals_prefill_inside_the_decode_forward(tiny_ckpt):
    """With `prefill_delay_steps=0` a request that arrives while rows decode is prefilled in the running batch's
    own forward (a mixed step). Every row, joining or running, equals the same request alone: tokens, and the
    first step's logits within 1e-5 in fp32, on every route."""
    p = phimm.load(tiny_ckpt, dtype="float32", threads=1, limits=EngineLimits(prefill_delay_steps=0))
    try:
        reqs = _requests()
        alone = [p(r, max_new_tokens=6, min_new_tokens=6, output_logits=True) for r in reqs]
        long_ref = p(reqs[3], max_new_tokens=60, min_new_tokens=60, output_logits=True)
        before = p.engine.counters["mixed_steps"]
        long = _running(p, reqs[3], 60)
        futures = []
        for r in reqs:  # one at a time, each while the batch decodes
            futures.append(p.submit(r, max_new_tokens=6, min_new_tokens=6, output_logits=True))
            time.sleep(0.003)
        for ref, fut in zip(alone, futures):
            got = fut.result(timeout=120)
            assert got.route == ref.route and got.token_ids == ref.token_ids
            assert (got.logits[0] - ref.logits[0]).abs().max().item() < 1e-5
            assert (got.logits - ref.logits).abs().max().item() < 1e-4
        got = long.result(timeout=120)
        assert got.token_ids == long_ref.token_ids
        assert (got.logits - long_ref.logits).abs().max().item() < 1e-4
        assert p.engine.counters["mixed_steps"] - before >= 2
        assert p.engine.stats()["running"] == 0 and p.engine.stats()["kv_positions"] == 0
    finally:
        p.close()


def test_a_failing_mixed_step_fails_only_the_joining_rows(tiny_ckpt, monkeypatch):
    """If a mixed step's forward fails, the rows it was prefilling fail with a typed error; the running rows
    decode on, unchanged, and the engine serves on."""
    from phimm import attention
    from phimm.errors import EngineError

    p = phimm.load(tiny_ckpt, dtype="float32", threads=1, limits=EngineLimits(prefill_delay_steps=0))
    try:
        reqs = _requests()
        long_ref = p(reqs[1], max_new_tokens=30, min_new_tokens=30)
        attend = attention.mixed_step_attention
        broken = []

        def attend_once_broken(mixed, *args, **kwargs):  # the first mixed forward breaks in its attention
            if not broken:
                broken.append(mixed)
                raise RuntimeError("injected failure")
            return attend(mixed, *args, **kwargs)

        monkeypatch.setattr(attention, "mixed_step_attention", attend_once_broken)
        long = _running(p, reqs[1], 30)
        bad = p.submit(reqs[2], max_new_tokens=4).result(timeout=120)
        assert broken and isinstance(bad.error, EngineError) and "injected failure" in str(bad.error)
        assert bad.finish_reason == "error"
        assert long.result(timeout=120).token_ids == long_ref.token_ids
        assert p(reqs[2], max_new_tokens=4).ok
    finally:
        p.close()


def test_idle_engine_keeps_no_inputs_or_cache(pipe):
    """After the last row finishes, the engine holds neither the requests' media inputs nor cache buffers."""
    import gc
    import weakref

    req = _requests()[3]  # image + audio
    prepared, route = pipe.prepare(req)
    from phimm.generation import GenerationOptions

    opts = GenerationOptions.from_kwargs(pipe.generation, max_new_tokens=2)  # done in the step admitting it
    pixels = weakref.ref(prepared.images[0].pixel_values)
    stream = pipe.engine.submit(prepared, route, opts, events=False)
    assert stream.result(timeout=120).error is None
    del prepared, stream
    deadline = time.time() + 10
    while pixels() is not None and time.time() < deadline:  # the loop drops them once it waits for work
        gc.collect()
        time.sleep(0.05)
    assert pixels() is None
    for layer in pipe.engine._cache.layers:
        assert layer.key_buf is None or layer.key_buf.untyped_storage().nbytes() == 0


def test_rows_media_encoded_together(tiny_ckpt):
    """A prefill's rows send their images through SigLIP in one call per adapter and their equal-length clips
    through the conformer in one call per projector; every row still equals the request alone."""
    p = phimm.load(tiny_ckpt, dtype="float32", threads=1)
    p.model.feature_cache.capacity = 0  # every call encodes
    aud = [make_audio(i, seconds=1.2) for i in range(3)]
    reqs = [phimm.Request(prompt="<|image|>what color", images=[make_image(i)]) for i in range(3)]
    reqs += [phimm.Request(prompt="<|audio|>transcribe the clip", audios=[a]) for a in aud]
    reqs += [phimm.Request(prompt="<|image|><|audio|>answer", images=[make_image(5)], audios=[aud[0]])]
    alone = [p(r, max_new_tokens=4, output_logits=True) for r in reqs]
    emb = p.model.decoder.embed_tokens_extend
    calls = {"siglip": 0, "conformer": 0}
    hooks = [emb.image_embed.img_processor.register_forward_hook(lambda *a: calls.__setitem__("siglip", calls["siglip"] + 1)),
             emb.audio_embed.encoder.register_forward_hook(lambda *a: calls.__setitem__("conformer", calls["conformer"] + 1))]
    prefills = p.engine.counters["prefills"]
    try:
        together = p(reqs, max_new_tokens=4, output_logits=True)
    finally:
        for h in hooks:
            h.remove()
    for a, t in zip(alone, together):
        assert t.token_ids == a.token_ids
        assert (t.logits - a.logits).abs().max().item() < 1e-5
    # per prefill bucket at most one SigLIP call (all rows here are on the vision adapter) and one conformer call
    # per projector; one at a time, 4 images and 4 clips would take 4 calls each
    buckets = p.engine.counters["prefills"] - prefills
    assert calls["siglip"] <= buckets and calls["siglip"] < 4
    assert calls["conformer"] <= 2 * buckets and calls["conformer"] < 4
    p.close()


def test_incremental_text_equals_full_decode(tiny_pipe):
    """The engine decodes only each row's new tokens (with a little context) per step: the text so far is always
    a prefix of decoding every token at once, multi-byte characters split over tokens included, and ends equal."""
    from phimm.engine import _Row

    engine = tiny_pipe.engine
    tok = engine.tokenizer
    text = "héllo wörld 😀 the red square — ünïcode ok"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # some characters span several tokens
    row = _Row.__new__(_Row)
    row.tokens, row.text, row.prefix_offset, row.read_offset = [], "", 0, 0
    for t in ids:
        row.tokens.append(t)
        full = tok.decode(row.tokens, skip_special_tokens=True)
        got = engine._text(row, full=False)
        assert full.startswith(got) and "\ufffd" not in got
    assert engine._text(row, full=False) == tok.decode(ids, skip_special_tokens=True)


def test_image_crops_in_chunks_equal_one_call(tiny_pipe, monkeypatch):
    """SigLIP takes at most CROPS_PER_CALL crops per call; the features do not depend on the chunking."""
    import phimm.model as pm

    images = [tiny_pipe.processor.process_image(make_image(i, size=(500, 260))) for i in range(3)]
    tiny_pipe.model.feature_cache.capacity = 0
    try:
        whole = tiny_pipe.model.image_features(images)
        monkeypatch.setattr(pm, "CROPS_PER_CALL", 2)
        chunked = tiny_pipe.model.image_features(images)
    finally:
        tiny_pipe.model.feature_cache.capacity = 32
    assert sum(img.pixel_values.shape[0] for img in images) > 2
    for a, b in zip(whole, chunked):
        assert (a - b).abs().max().item() < 1e-5


def test_engine_limits_are_checked():
    from phimm.errors import GenerationConfigError

    assert EngineLimits().prefill_delay_steps is None  # the engine's choice: 0 with mixed steps, else 2
    assert EngineLimits(prefill_delay_steps=0).prefill_delay_steps == 0
    for bad in (dict(max_running=0), dict(max_waiting=-1), dict(prefill_delay_steps=-1),
                dict(kv_budget_tokens=True), dict(max_prefill_tokens=1.5)):
        with pytest.raises(GenerationConfigError, match=next(iter(bad))):
            EngineLimits(**bad)
