"""What the commands print while they work: a line per frame or band above a progress bar with
the time left (rich), or one JSON object per line; the summary at the end; failures in red.

Used by :mod:`nsg_gpu.cli` (``nsg normalize``, ``nsg stack``); the rates and ETA come from
:class:`nsg_gpu.progress.RunProgress`.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from .progress import RunProgress, format_seconds

__all__ = ["RunDisplay", "StackDisplay"]


class _Display:
    """The rich consoles and the overall bar with its ETA (none when quiet or in JSON lines),
    shared by the commands' displays."""

    def __init__(self, *, quiet: bool, json_lines: bool, label: str) -> None:
        from rich.console import Console

        self.quiet = quiet
        self.json_lines = json_lines
        self.console = Console(highlight=False)
        self.errors = Console(stderr=True, highlight=False)
        self.rate = None  # RunProgress, once the total is known
        self.bar = None
        self.task = None
        if not quiet and not json_lines:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(
                TextColumn(label),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("ETA {task.fields[eta]}"),
                console=self.console,
                transient=True,
            )

    def __enter__(self):
        if self.bar is not None:
            # No total until the work is planned: the bar pulses meanwhile.
            self.task = self.bar.add_task(self.__class__.__name__, total=None, eta="-")
            self.bar.start()
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        return False

    def _advance(self, done: int, total: int, **update) -> float | None:
        """Count ``done`` of ``total`` (``update`` goes to :meth:`RunProgress.update`), move the
        bar, and return the seconds left (None while unknown)."""
        if self.rate is None:
            self.rate = RunProgress(total)
        self.rate.update(done, **update)
        eta = self.rate.eta_seconds
        if self.bar is not None:
            self.bar.update(self.task, total=total, completed=done, eta="-" if eta is None else format_seconds(eta))
        return eta

    def _print(self, text: str) -> None:
        from rich.markup import escape

        (self.bar.console if self.bar is not None else self.console).print(escape(text), soft_wrap=True)

    def _print_error(self, text: str) -> None:
        from rich.markup import escape

        self.errors.print(escape(text), style="red", soft_wrap=True)


class RunDisplay(_Display):
    """What ``normalize`` prints: a line per frame and an overall bar (rich), or JSON lines."""

    def __init__(self, *, quiet: bool, json_lines: bool) -> None:
        super().__init__(quiet=quiet, json_lines=json_lines, label="normalizing")

    def frame_done(self, result, done: int, total: int) -> None:
        eta = self._advance(done, total, kept=result.resumed)
        if self.json_lines:
            row = {
                "event": "frame",
                "done": done,
                "total": total,
                "frames_per_minute": self.rate.frames_per_minute,
                "eta_seconds": eta,
                **result.row(),
            }
            typer.echo(json.dumps(row, allow_nan=False, default=str))
        elif result.status == "failed":
            self._print_error(f"[{done}/{total}] FAILED {result.error}")
        elif not self.quiet:
            self._print(f"{_frame_line(result, done, total)}  ({self.rate.summary()})")

    def note(self, text: str) -> None:
        """A line of its own above the bar (e.g. the cluster the run uses)."""
        self._print(text)

    def finish(self, run, *, backend: str, output_dir: Path) -> None:
        done = sum(1 for f in run.frames if f.status != "failed")
        if self.json_lines:
            # Rejection is decided once every frame is done: one event per rejected frame.
            for f in run.frames:
                if f.rejected:
                    event = {"event": "rejected", "file": f.path, "output": f.output, "rejected": f.rejected}
                    event |= {"relative_weight": f.relative_weight, "relative_transmission": f.relative_transmission}
                    typer.echo(json.dumps(event, allow_nan=False, default=str))
            summary = {
                "event": "run",
                "reference": run.reference,
                "reference_reason": run.reference_reason,
                "frames": len(run.frames),
                "normalized": done,
                "failed": len(run.failed),
                "rejected": sum(1 for f in run.frames if f.rejected),
                "kept": sum(1 for f in run.frames if f.resumed),
                "not_tried": run.not_tried,
                "backend": backend,
                "results": str(output_dir / "results.csv"),
                "report": run.report,
                "report_error": run.report_error,
            }
            typer.echo(json.dumps(summary, allow_nan=False, default=str))
            return
        if run.reference_reason:  # chosen by --reference auto: said even when quiet
            self._print(f"reference: {Path(run.reference).name}: {run.reference_reason}")
        self._print(
            f"{done} of {len(run.frames)} frames normalized on {backend}; results in {output_dir / 'results.csv'}"
        )
        if run.not_tried:
            self._print_error(f"stopped at the first failure (--stop-on-error): {run.not_tried} frame(s) not tried")
        kept = sum(1 for f in run.frames if f.resumed)
        if kept:
            self._print(
                f"{kept} frame(s) kept from an earlier run (outputs complete and up to date; --overwrite redoes them)"
            )
        rejected = [f for f in run.frames if f.rejected]
        if rejected:
            self._print(f"{len(rejected)} frame(s) rejected, their outputs in {output_dir / 'rejected'}:")
            for f in rejected:
                self._print(f"  {Path(f.path).name}: {f.rejected}")
        for f in run.frames:
            if f.warning:
                self._print_error(f"warning: {Path(f.path).name}: {f.warning}")
            if f.scale_flag and not f.rejected:
                self._print_error(f"warning: {Path(f.path).name}: scale in doubt: {f.scale_flag}")
        if run.report and not self.quiet:
            self._print(f"report: {run.report}")
        if run.report_error:
            self._print_error(f"report not written: {run.report_error}")
        if run.failed:
            self._print_error(f"{len(run.failed)} frame(s) failed:")
            for f in run.failed:
                self._print_error(f"  {f.error}")


def _frame_line(result, done: int, total: int) -> str:
    name = Path(result.path).name
    if result.resumed:
        return f"[{done}/{total}] {name}: output complete and up to date, kept"
    if result.status == "reference":
        return f"[{done}/{total}] {name}: reference, {result.star_pairs} stars"
    errors = list(result.transmission_error or []) + [None] * len(result.transmission)
    transmission = " ".join(
        f"{t:.4f}" + (f"+-{e:#.2g}" if e is not None else "") for t, e in zip(result.transmission, errors)
    )
    return (
        f"[{done}/{total}] {name}: transmission {transmission}  weight {result.weight:.3f}  "
        f"pairs {result.star_pairs}  samples {result.samples}  {result.seconds:.1f} s"
    )


class StackDisplay(_Display):
    """What ``stack`` prints: an overall bar over the bands with the ETA, or JSON lines."""

    def __init__(self, *, quiet: bool, json_lines: bool) -> None:
        super().__init__(quiet=quiet, json_lines=json_lines, label="stacking (bands)")

    def band_done(self, done: int, total: int) -> None:
        eta = self._advance(done, total)
        if self.json_lines:
            typer.echo(json.dumps({"event": "band", "done": done, "total": total, "eta_seconds": eta}))

    def finish(self, result) -> None:
        if self.json_lines:
            typer.echo(json.dumps(result.summary(), allow_nan=False, default=str))
            return
        rejection = result.rejection
        lines = [
            f"stacked {len(result.used)} frame{'' if len(result.used) == 1 else 's'} into {result.output} "
            f"in {format_seconds(result.seconds)} "
            f"on {result.backend}",
        ]
        if not self.quiet:
            chosen = rejection.describe() if rejection.reason == "chosen" else rejection.reason
            lines.append(f"weights {result.weights}; rejection {chosen}")
            lines.append(
                f"rejected {100 * result.rejected_low_share:.3g} % of the samples low, "
                f"{100 * result.rejected_high_share:.3g} % high; per frame in {result.csv}"
            )
            if result.maps:
                lines.append("maps: " + ", ".join(f"{k} {v}" for k, v in result.maps.items()))
            if result.report:
                lines.append(f"report: {result.report}")
        for line in lines:
            self._print(line)
        if result.report_error:
            self._print_error(f"report not written: {result.report_error}")
        if result.skipped:
            self._print_error(f"{len(result.skipped)} frame(s) left out:")
            for frame in result.skipped:
                self._print_error(f"  {frame.error}")
