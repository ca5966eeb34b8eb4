"""A text summary of the speedscope profiles the benchmarks write with `--profile DIR`.

py-spy's speedscope JSON is meant for a browser; a note, a review or a terminal wants the few
lines that say where the time went. For each thread (one speedscope profile each) this prints
its sampled seconds and the functions with the most of them, inclusive (the function and what it
called) and self (the function's own lines), so two profiles compare at a glance.

    .venv/bin/python bench/profile_summary.py /tmp/prof/*.speedscope.json
    .venv/bin/python bench/profile_summary.py --top 15 --min-share 0.05 /tmp/prof/sdk-tiny.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any


def frame_label(frame: dict[str, Any]) -> str:
    """`function (file:line)`, with the file shortened to its last two path parts."""
    file = "/".join(Path(str(frame.get("file", "?"))).parts[-2:])
    line = frame.get("line")
    return f"{frame.get('name', '?')} ({file}{f':{line}' if line else ''})"


def summarize(profile: dict[str, Any], frames: list[dict[str, Any]], top: int) -> list[str]:
    """Lines for one sampled profile: its total, then the top inclusive and self frames.
    A stack lists its frames from the thread's root to the sampled line (py-spy's order)."""
    samples: list[list[int]] = profile.get("samples", [])
    inclusive: dict[int, float] = defaultdict(float)
    own: dict[int, float] = defaultdict(float)
    for stack, weight in zip(samples, weights_of(profile), strict=True):
        for index in set(stack):
            inclusive[index] += weight
        if stack:
            own[stack[-1]] += weight
    total = sum(weights_of(profile))
    unit = profile.get("unit", "samples")
    lines = [f"{profile.get('name', '?')}: {total:.2f} {unit}, {len(samples)} samples"]
    for title, counts in (("inclusive", inclusive), ("self", own)):
        lines.append(f"  {title}:")
        # Frames in every sample (the thread's bootstrap) say nothing: left out.
        ranked = sorted(counts.items(), key=lambda item: -item[1])
        telling = [(i, amount) for i, amount in ranked if amount < 0.999 * total]
        for index, amount in telling[:top]:
            share = amount / total if total else 0.0
            lines.append(f"    {amount:9.2f} {share:6.1%}  {frame_label(frames[index])}")
    return lines


def weights_of(profile: dict[str, Any]) -> list[float]:
    """Each sample's weight (py-spy: seconds); 1 per sample when the file gives none."""
    samples = profile.get("samples", [])
    return [float(w) for w in profile.get("weights") or [1.0] * len(samples)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="speedscope JSON files")
    parser.add_argument("--top", type=int, default=10, help="frames listed per thread")
    parser.add_argument(
        "--min-share",
        type=float,
        default=0.02,
        help="skip threads with less than this share of a file's samples",
    )
    args = parser.parse_args()
    for path in args.files:
        document = json.loads(path.read_text())
        frames = document["shared"]["frames"]
        profiles = document["profiles"]
        grand = sum(sum(weights_of(p)) for p in profiles)
        print(f"== {path} ({grand:.2f} in all, {len(profiles)} threads)")
        for profile in sorted(profiles, key=lambda p: -sum(weights_of(p))):
            if grand and sum(weights_of(profile)) / grand < args.min_share:
                continue
            print("\n".join(summarize(profile, frames, args.top)))
        print()


if __name__ == "__main__":
    main()
