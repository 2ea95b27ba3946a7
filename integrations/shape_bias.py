"""Shape-bias metrics from per-image decisions in model-vs-human's raw-data CSV format.

Every function takes ``responses``: a DataFrame, a CSV path, a folder (all ``*.csv`` in it), or a list
of those. Columns: ``subj,session,trial,rt,object_response,category,condition,imagename``; ``category``
is the shape (the folder the image came from), and the texture is read from the image name
(``..._airplane1-bicycle2.png`` -> ``bicycle``), as the benchmark's ``ShapeBias`` analysis does.
Trials whose shape and texture are the same category carry no cue conflict and are left out.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Union

import pandas as pd

COLUMNS = ("subj", "session", "trial", "rt", "object_response", "category", "condition", "imagename")
Responses = Union[pd.DataFrame, str, Path, Iterable[Union[str, Path]]]


def _read_csv(path: Path) -> pd.DataFrame:
    frame = pd.read_csv(path)
    frame.columns = [c.lower() for c in frame.columns]  # some of the benchmark's files capitalise them
    missing = [c for c in ("subj", "object_response", "category", "imagename") if c not in frame.columns]
    if missing:
        raise ValueError(f"{path} is not a model-vs-human raw-data CSV: it lacks columns {missing} "
                         f"(expected {list(COLUMNS)})")
    return frame


def read_responses(responses: Responses) -> pd.DataFrame:
    """One DataFrame of trials from a DataFrame, a CSV file, a folder of CSVs, or a list of these."""
    if isinstance(responses, pd.DataFrame):
        return responses
    if isinstance(responses, (str, Path)):
        path = Path(responses)
        if path.is_dir():
            files = sorted(path.glob("*.csv"))
            if not files:
                raise ValueError(f"{path} holds no .csv files")
            return pd.concat([_read_csv(f) for f in files], ignore_index=True)
        if not path.is_file():
            raise FileNotFoundError(f"responses {str(path)!r}: no such file or folder")
        return _read_csv(path)
    frames = [read_responses(r) for r in responses]
    if not frames:
        raise ValueError("responses is an empty list")
    return pd.concat(frames, ignore_index=True)


def texture_category(imagename: str) -> str:
    """The texture cue of a stimulus name: ``'0001_x_bird3-bear2.png'`` -> ``'bear'``."""
    stem = str(imagename).split("_")[-1].split(".")[0]
    return re.sub(r"\d", "", stem.split("-")[-1])


def conflict_trials(responses: Responses) -> pd.DataFrame:
    """The trials whose shape and texture differ, with ``shape`` and ``texture`` columns added."""
    frame = read_responses(responses)
    frame = frame.assign(shape=frame["category"], texture=frame["imagename"].map(texture_category))
    return frame.loc[frame["shape"] != frame["texture"]]


def shape_texture_fractions(responses: Responses) -> dict[str, float]:
    """Fractions of cue-conflict trials decided by shape, by texture, by either; and the shape bias.

    The benchmark divides its ``fraction-correct-shape/texture`` by ALL trials (same-cue ones too);
    here the denominator is the cue-conflict trials, so ``shape_or_texture`` is a proper fraction.
    """
    trials = conflict_trials(responses)
    count = len(trials)
    if count == 0:
        raise ValueError("no cue-conflict trials (every image's shape equals its texture, or no rows)")
    shape = float((trials["object_response"] == trials["shape"]).sum())
    texture = float((trials["object_response"] == trials["texture"]).sum())
    return {"shape": shape / count, "texture": texture / count, "shape_or_texture": (shape + texture) / count,
            "shape_bias": shape / (shape + texture) if shape + texture else float("nan"), "trials": count}


def shape_bias(responses: Responses) -> float:
    """Shape decisions / (shape + texture decisions) over the cue-conflict trials (NaN if there are none)."""
    return shape_texture_fractions(responses)["shape_bias"]


def shape_or_texture_fraction(responses: Responses) -> float:
    """Fraction of cue-conflict trials whose decision is the shape or the texture category."""
    return shape_texture_fractions(responses)["shape_or_texture"]


def category_shape_bias(responses: Responses) -> pd.Series:
    """Shape bias per shape category (index: category), as in the benchmark's matrix plot."""
    trials = conflict_trials(responses)
    shape_hits = (trials["object_response"] == trials["shape"]).groupby(trials["shape"]).sum()
    texture_hits = (trials["object_response"] == trials["texture"]).groupby(trials["shape"]).sum()
    decided = shape_hits + texture_hits
    return (shape_hits / decided.where(decided > 0)).rename("shape_bias").rename_axis("category")


def accuracy(responses: Responses) -> float:
    """Fraction of trials whose decision is the ``category`` column (16-class accuracy: edge, silhouette)."""
    frame = read_responses(responses)
    if len(frame) == 0:
        raise ValueError("no trials")
    return float((frame["object_response"] == frame["category"]).mean())


def summarize(responses: Responses, by: str = "subj") -> pd.DataFrame:
    """One row per ``by`` value (a run or subject): shape bias and the shape / texture / either fractions."""
    frame = read_responses(responses)
    rows = {key: shape_texture_fractions(group) for key, group in frame.groupby(by, sort=False)}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis(by)
