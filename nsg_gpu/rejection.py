"""Frame rejection after a run, as NSG does it: too little weight or too little transmission;
and, beyond NSG, a scale that the stars do not pin down (``max_scale_error``).

For every normalized frame (the reference included) the weight ``w`` and the transmission
``T`` (the mean of ``1/m`` over the channels) are divided by the exposure time when every one
of those frames has one, then by the best frame's value: ``relative_weight = (w/t) / max(w/t)``
and ``relative_transmission = (T/t) / max(T/t)`` (``w / max w`` and ``T / max T`` otherwise).
Beyond NSG, the best is taken among the frames whose mean transmission is not in doubt
(:attr:`nsg_gpu.results.FrameResult.transmission_doubt`: channels that agree, enough star
pairs, the mean's relative standard error within 3 %; the reference always counts), where
there are any: a frame whose transmission the stars do not pin down would otherwise set the
bar for every other frame by its own error (two 20 s frames of NGC 7023 from another camera,
whose red and blue stand 35-55 % above their green per unit exposure, had every other frame
of the reference's night rejected). Such a frame's own relative values may then exceed 1.
A frame is rejected when ``relative_weight <= min_weight`` or ``relative_transmission <=
min_transmission`` (NSG's defaults 0.25 and 0.75; a threshold of 0 turns its test off); the
reference never is. A rejected frame's
output is moved into ``<output_dir>/rejected/`` by a rename (atomic: the file is in one place or
the other, never both or neither), and a frame accepted again on a rerun with other thresholds
is moved back.

In the flow: after every frame of a run is done (:func:`nsg_gpu.run.normalize`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .errors import OutputError
from .scalefit import scale_doubt

__all__ = ["REJECTED_DIR", "relative_quality", "reject_frames"]

#: Subfolder of the output directory that holds the outputs of rejected frames.
REJECTED_DIR = "rejected"


def _normalized(result) -> bool:
    return result.status in ("ok", "reference") and result.weight is not None and bool(result.transmission)


def relative_quality(frames: Sequence) -> bool:
    """Set ``relative_weight`` and ``relative_transmission`` on every normalized frame.

    Each is relative to the best frame whose mean transmission is not in doubt (the module's
    text).

    Returns
    -------
    bool
        True when the values are per unit exposure (every normalized frame has one).
    """
    normalized = [f for f in frames if _normalized(f)]
    if not normalized:
        return False
    per_exposure = all(f.exposure is not None and f.exposure > 0 for f in normalized)
    weights, transmissions = [], []
    for f in normalized:
        time = f.exposure if per_exposure else 1.0
        weights.append(f.weight / time)
        transmissions.append(sum(f.transmission) / len(f.transmission) / time)
    # The best among the frames whose mean transmission is not in doubt, where there are any.
    sure = [i for i, f in enumerate(normalized) if not getattr(f, "transmission_doubt", None)]
    sure = sure or range(len(normalized))
    best_weight, best_transmission = max(weights[i] for i in sure), max(transmissions[i] for i in sure)
    for f, w, t in zip(normalized, weights, transmissions):
        f.relative_weight = w / best_weight if best_weight > 0 else 0.0
        f.relative_transmission = t / best_transmission if best_transmission > 0 else 0.0
    return per_exposure


def _move(result, directory: Path) -> None:
    if not result.output:
        return
    source = Path(result.output)
    destination = directory / source.name
    if source == destination or not source.exists():
        return
    try:
        directory.mkdir(parents=True, exist_ok=True)
        os.replace(source, destination)
    except OSError as exc:
        raise OutputError(f"{source}: cannot be moved to {directory} ({exc.strerror or exc})") from exc
    result.output = str(destination)


def reject_frames(
    frames: Sequence,
    *,
    min_weight: float,
    min_transmission: float,
    output_dir: str | os.PathLike,
    max_scale_error: float | None = None,
) -> list:
    """Mark the frames to reject and put every output where it belongs; return the rejected.

    Parameters
    ----------
    frames : sequence of FrameResult
        A run's results; the rows are updated in place (``rejected``, ``relative_weight``,
        ``relative_transmission``, and ``output`` when a file moves).

    min_weight, min_transmission : float
        Thresholds as fractions of the best frame's value.

    max_scale_error : float, optional
        Largest relative standard error of a transmission; frames beyond it, whose channels
        disagree or whose scale comes from fewer than 3 star pairs
        (:func:`nsg_gpu.scalefit.scale_doubt`), are rejected.

    output_dir : path
        The run's output directory; rejected outputs go to its ``rejected/`` subfolder.

    Raises
    ------
    OutputError
        An output cannot be moved.
    """
    output_dir = Path(output_dir)
    per_exposure = relative_quality(frames)
    unit = " per unit exposure" if per_exposure else ""
    rejected = []
    for f in frames:
        if not _normalized(f):
            continue
        reasons = []
        if f.status != "reference":
            if min_weight > 0 and f.relative_weight <= min_weight:
                reasons.append(f"weight {f.relative_weight:.3f} of the best{unit} (minimum {min_weight:g})")
            if min_transmission > 0 and f.relative_transmission <= min_transmission:
                reasons.append(
                    f"transmission {f.relative_transmission:.3f} of the best{unit} (minimum {min_transmission:g})"
                )
            doubt = (
                scale_doubt(f.transmission, f.transmission_error, threshold=max_scale_error, star_pairs=f.star_pairs)
                if max_scale_error
                else None
            )
            if doubt:
                reasons.append(f"scale in doubt: {doubt}")
        f.rejected = "; ".join(reasons) or None
        if f.rejected:
            rejected.append(f)
        _move(f, output_dir / REJECTED_DIR if f.rejected else output_dir)
    return rejected
