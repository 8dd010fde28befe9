"""What a training run reports as it goes: log.jsonl (every step), TensorBoard, and a
printed line every ``train.log_every`` steps."""

from __future__ import annotations

import json
from pathlib import Path

from dftune.files import read_jsonl, write_text


class RunLog:
    """log.jsonl (every step; on resume, cut back to the checkpoint's step so replayed steps
    appear once), the trackers ``report_to`` names (``dftune.trackers``), and a printed line
    every ``every`` steps."""

    def __init__(self, out: Path, report_to: list[str], every: int, enabled: bool, start: int, settings: dict):
        self.enabled, self.every, self.trackers, self.file = enabled, max(1, every), [], None
        if not enabled:
            return
        for name in ("log.jsonl", "eval_curve.jsonl"):
            path = out / name
            if path.exists():
                kept = [r for r in read_jsonl(path) if r.get("step", 0) <= start]
                write_text(path, "".join(_json_line(r) for r in kept))
        self.file = (out / "log.jsonl").open("a")
        from dftune.trackers import open_trackers

        self.trackers = open_trackers(report_to, out, start, settings)

    def write(self, rec: dict, bar) -> None:
        if not self.enabled:
            return
        self.file.write(_json_line(rec))
        self.file.flush()
        numbers = {k: v for k, v in rec.items() if isinstance(v, (int, float)) and k != "step"}
        for tracker in self.trackers:
            tracker.log(numbers, rec["step"])
        if bar is not None:
            bar.set_postfix(loss=f"{rec['loss']:.4f}", nll=f"{rec['nll']:.3f}", p=f"{rec['mean_prob']:.3f}")
        if rec["step"] % self.every == 0:
            text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items())
            (bar.write if bar is not None else print)(text)

    def close(self):
        if self.file:
            self.file.close()
        for tracker in self.trackers:
            tracker.close()


def _json_line(rec: dict) -> str:
    return json.dumps(rec) + "\n"

