"""What `phimm eval` leaves in `--out` besides the predictions: `summary.json`, `report.md` and a bar chart (PNG,
drawn with Pillow)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["bar_chart", "markdown_table", "render_report", "write_outputs", "percent"]


def percent(value: float | None, digits: int = 2) -> str:
    """0.1234 -> "12.34%"; None -> "n/a"."""
    return "n/a" if value is None else f"{100 * value:.{digits}f}%"


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (pipes in cells escaped)."""
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# the chart
# --------------------------------------------------------------------------------------------------------------


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # an old Pillow without sized default fonts
        return ImageFont.load_default()


def _text_width(draw, text: str, font) -> float:
    return draw.textlength(text, font=font)


def _fit(draw, text: str, font, width: float) -> str:
    if _text_width(draw, text, font) <= width:
        return text
    while text and _text_width(draw, text + "…", font) > width:
        text = text[:-1]
    return text + "…"


def bar_chart(
    path: str | Path,
    title: str,
    rows: Sequence[tuple[str, int, float]],
    *,
    value_label: Callable[[float], str] = lambda v: percent(v, 1),
    tick_label: Callable[[float], str] = lambda v: percent(v, 0),
    axis_max: float | None = None,
    width: int = 900,
) -> Path:
    """Draws a horizontal bar chart of `(label, count, value)` rows to a PNG and returns its path.

    Bars run from 0 to `axis_max` (default: 1.0, doubled until the largest value fits, as a WER past
    100 % needs); each bar is labelled with its value and its count.
    """
    from PIL import Image, ImageDraw

    path = Path(path)
    title_font, font, small = _font(20), _font(14), _font(12)
    bar_h, gap, top, bottom, right = 22, 8, 60, 46, 150
    height = top + bottom + max(len(rows), 1) * (bar_h + gap)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((16, 14), title, fill="black", font=title_font)

    labels = [str(r[0]) for r in rows]
    label_w = min(max([_text_width(draw, t, font) for t in labels] + [40]), width * 0.35)
    left = int(label_w) + 28
    plot_w = width - left - right
    top_value = max([r[2] for r in rows if r[2] is not None and math.isfinite(r[2])] + [0.0])
    if axis_max is None:
        axis_max = 1.0
        while axis_max < top_value:  # 1, 2, 4, ...: ticks at round quarters
            axis_max *= 2
    axis_max = max(axis_max, 1e-9)

    # grid and axis labels
    axis_y = top + len(rows) * (bar_h + gap)
    for k in range(5):
        value = axis_max * k / 4
        x = left + plot_w * k / 4
        draw.line([(x, top - 6), (x, axis_y)], fill=(225, 225, 225) if k else (120, 120, 120), width=1)
        tick = tick_label(value)
        draw.text((x - _text_width(draw, tick, small) / 2, axis_y + 6), tick, fill=(90, 90, 90), font=small)
    if not rows:
        draw.text((left + 10, top + 4), "no data", fill=(90, 90, 90), font=font)

    for i, (label, count, value) in enumerate(rows):
        y = top + i * (bar_h + gap)
        text = _fit(draw, str(label), font, label_w)
        draw.text((left - 10 - _text_width(draw, text, font), y + 3), text, fill="black", font=font)
        shown = 0.0 if value is None or not math.isfinite(value) else min(max(value, 0.0), axis_max)
        bar_w = plot_w * shown / axis_max
        if bar_w >= 1:
            draw.rectangle([left, y, left + bar_w, y + bar_h], fill=(66, 114, 196))
        note = f"{value_label(value) if value is not None else 'n/a'}  (n={count})"
        draw.text((left + bar_w + 6, y + 4), note, fill="black", font=small)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path


# --------------------------------------------------------------------------------------------------------------
# report.md and summary.json
# --------------------------------------------------------------------------------------------------------------


def _settings_line(summary: dict) -> str:
    settings = summary.get("settings", {})
    parts = [f"{k.replace('_', ' ')} {v}" for k, v in settings.items() if v is not None]
    return ", ".join(parts)


def render_report(summary: dict, breakdown_title: str, rows: Sequence[tuple[str, int, float]], plot: str | None,
                  records: Sequence[dict] = ()) -> str:
    """The Markdown report of a run."""
    task = summary.get("task")
    lines = [f"# phimm eval {task}", ""]
    if task == "asr":
        lines.append(markdown_table(
            ["model", "data", "utterances", "errors", "WER", "WER (raw)", "CER", "CER (raw)", "RTFx"],
            [[summary.get("model"), summary.get("data"), summary.get("count"), summary.get("errors"),
              percent(summary.get("wer")), percent(summary.get("wer_raw")), percent(summary.get("cer")),
              percent(summary.get("cer_raw")), summary.get("rtfx") if summary.get("rtfx") is not None else "n/a"]],
        ))
        lines += ["", f"WER and CER after `{summary.get('normalizer', 'EnglishTextNormalizer')}` (Whisper-style); "
                      "raw: the texts as they are. A sample that failed counts as an empty transcript. "
                      f"{summary.get('audio_s', 0):.1f} s of audio in {summary.get('model_inference_s', 0):.1f} s "
                      "of inference."]
        header = ["duration", "utterances", "WER"]
    else:
        lines.append(markdown_table(
            ["model", "data", "questions", "errors", "VQA accuracy", "exact match", "ANLS"],
            [[summary.get("model"), summary.get("data"), summary.get("count"), summary.get("errors"),
              percent(summary.get("accuracy")), percent(summary.get("exact_match")), percent(summary.get("anls"))]],
        ))
        lines += ["", f"VQA accuracy as the official VQAv2 evaluation ({summary.get('vqa_revision')} revision); "
                      f"the per-question score is `{summary.get('metric')}`. A sample that failed counts as an "
                      "empty answer."]
        header = ["question type", "questions", breakdown_title.split(" by ")[0]]
    lines += ["", f"Prompt: `{summary.get('prompt')}`" + (
        f"; spoken questions: `{summary.get('spoken_prompt')}`" if summary.get("spoken_questions") else "")]
    lines += [f"Settings: {_settings_line(summary)}; wall time {summary.get('wall_time_s', 0):.1f} s"
              + (f" ({summary['resumed']} samples from an earlier run)" if summary.get("resumed") else "") + "."]
    lines += ["", f"## {breakdown_title}", "", markdown_table(header, [[r[0], r[1], percent(r[2])] for r in rows])]
    if task == "vqa" and summary.get("by_answer_type"):
        metric = summary.get("metric")
        lines += ["", "## By answer type", "", markdown_table(
            ["answer type", "questions", header[2]],
            [[k, v["count"], percent(v[metric])] for k, v in summary["by_answer_type"].items()],
        )]
    if plot:
        lines += ["", f"![{breakdown_title}]({plot})"]
    failed = [r for r in records if r.get("error")]
    if failed:
        lines += ["", f"## Errors ({len(failed)})", "", markdown_table(
            ["id", "error"], [[r["id"], r["error"]] for r in failed[:20]])]
        if len(failed) > 20:
            lines += ["", f"... and {len(failed) - 20} more in predictions.jsonl."]
    return "\n".join(lines) + "\n"


def write_outputs(out_dir: str | Path, task: Any, summary: dict, records: Sequence[dict]) -> None:
    """Writes the plot, `report.md` and `summary.json` of a finished run to `out_dir`."""
    out_dir = Path(out_dir)
    title, rows = task.breakdown(summary)
    plot = task.plot_name()
    bar_chart(out_dir / plot, title, rows)
    summary["plot"] = plot
    (out_dir / "report.md").write_text(render_report(summary, title, rows, plot, records), encoding="utf-8")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n",
                                          encoding="utf-8")
