"""Shape-bias metrics from per-image decisions in model-vs-human's raw-data CSV format.

Every function takes ``responses``: a DataFrame, a CSV path, a folder (all ``*.csv`` in it), or a list
of those. Columns: ``subj,session,trial,rt,object_response,category,condition,imagename``; ``category``
is the shape (the folder the image came from), and the texture is read from the image name
(``..._airplane1-bicycle2.png`` -> ``bicycle``), as the benchmark's ``ShapeBias`` analysis does.
Trials whose shape and texture are the same category carry no cue conflict and are left out.

Every table is checked before it is counted, because a wrong name silently changes the score (an
image name without the ``<shape><i>-<texture><j>`` pattern would count as a shape decision, a category
``Bear`` as a 17th class): ``category`` must be one of the 16 categories, ``object_response`` one of
them or ``na`` / empty (a human who did not answer), and for shape bias the image name must carry both
cues, its shape equal to ``category``. Errors name the file and line (or the DataFrame row).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Union

from . import optional
from .imagenet16 import CATEGORIES

if TYPE_CHECKING:
    import pandas as pd

COLUMNS = ("subj", "session", "trial", "rt", "object_response", "category", "condition", "imagename")
REQUIRED = ("subj", "object_response", "category", "imagename")
NO_RESPONSE = "na"  # the benchmark's human files mark a trial without an answer so
Responses = Union["pd.DataFrame", str, Path, Iterable[Union[str, Path]]]
# The stimulus file name at the end of ``imagename`` (human files prefix it with trial metadata and "_").
CUE_CONFLICT_NAME = re.compile(r"(?:^|[_/\\])(?P<shape>[A-Za-z]+)\d+-(?P<texture>[A-Za-z]+)\d+\.\w+$")
NAME_PATTERN = "<shape><i>-<texture><j>.<ext> (e.g. airplane1-bicycle2.png)"


class _Table:
    """One source's trials and how to point at one of its rows in an error message."""

    def __init__(self, frame: "pd.DataFrame", path: Path | None):
        self.frame, self.path = frame, path

    def where(self, position: int) -> str:
        if self.path is None:
            return f"DataFrame row {self.frame.index[position]!r}"
        return f"{self.path}, line {position + 2}"  # line 1 is the header

    def check(self, position_mask, message) -> None:
        """Raise ``ValueError`` at the first row where ``position_mask`` holds; ``message(row)`` says what is wrong."""
        bad = position_mask.to_numpy().nonzero()[0]
        if len(bad):
            row = self.frame.iloc[bad[0]]
            more = f" ({len(bad) - 1} more rows like it)" if len(bad) > 1 else ""
            raise ValueError(f"{self.where(bad[0])}: {message(row)}{more}")


def _read_csv(path: Path) -> "pd.DataFrame":
    frame = optional("pandas").read_csv(path)
    frame.columns = [c.lower() for c in frame.columns]  # some of the benchmark's files capitalise them
    return frame


def _checked(table: _Table) -> _Table:
    frame = table.frame
    missing = [c for c in REQUIRED if c not in frame.columns]
    if missing:
        where = table.path if table.path is not None else "DataFrame"
        raise ValueError(f"{where} is not a model-vs-human raw-data table: it lacks columns {missing} "
                         f"(expected {list(COLUMNS)})")
    allowed = f"is not one of the 16 categories {list(CATEGORIES)}"
    table.check(~frame["category"].isin(CATEGORIES), lambda row: f"category {row['category']!r} {allowed}")
    response = frame["object_response"]
    table.check(~(response.isin(CATEGORIES) | response.isna() | (response == NO_RESPONSE)),
                lambda row: f"object_response {row['object_response']!r} {allowed} (or {NO_RESPONSE!r})")
    return table


def _tables(responses: Responses) -> Iterator[_Table]:
    pd = optional("pandas")
    if isinstance(responses, pd.DataFrame):
        yield _checked(_Table(responses, None))
    elif isinstance(responses, (str, Path)):
        path = Path(responses)
        if path.is_dir():
            files = sorted(path.glob("*.csv"))
            if not files:
                raise ValueError(f"{path} holds no .csv files")
            for file in files:
                yield _checked(_Table(_read_csv(file), file))
        elif path.is_file():
            yield _checked(_Table(_read_csv(path), path))
        else:
            raise FileNotFoundError(f"responses {str(path)!r}: no such file or folder")
    else:
        empty = True
        for item in responses:
            empty = False
            yield from _tables(item)
        if empty:
            raise ValueError("responses is an empty list")


def _concat(frames: list["pd.DataFrame"]) -> "pd.DataFrame":
    return frames[0] if len(frames) == 1 else optional("pandas").concat(frames, ignore_index=True)


def read_responses(responses: Responses) -> "pd.DataFrame":
    """One checked DataFrame of trials from a DataFrame, a CSV file, a folder of CSVs, or a list of these."""
    return _concat([table.frame for table in _tables(responses)])


def stimulus_cues(imagename: str) -> tuple[str, str]:
    """(shape, texture) of a cue-conflict stimulus name: ``'0001_x_bird3-bear2.png'`` -> ``('bird', 'bear')``."""
    match = CUE_CONFLICT_NAME.search(str(imagename))
    if match is None:
        raise ValueError(f"imagename {imagename!r} does not end in a cue-conflict stimulus name {NAME_PATTERN}")
    return match["shape"], match["texture"]


def texture_category(imagename: str) -> str:
    """The texture cue of a stimulus name: ``'0001_x_bird3-bear2.png'`` -> ``'bear'``."""
    return stimulus_cues(imagename)[1]


def _cues(table: _Table) -> "pd.DataFrame":
    """``table``'s trials with ``shape`` and ``texture`` read from the image names, each name checked."""
    frame = table.frame
    cues = frame["imagename"].astype(str).str.extract(CUE_CONFLICT_NAME)
    table.check(cues["shape"].isna(),
                lambda row: f"imagename {row['imagename']!r} does not end in a cue-conflict stimulus name "
                            f"{NAME_PATTERN}")
    table.check(cues["shape"] != frame["category"],
                lambda row: f"imagename {row['imagename']!r} has shape {stimulus_cues(row['imagename'])[0]!r} "
                            f"but category {row['category']!r}")
    table.check(~cues["texture"].isin(CATEGORIES),
                lambda row: f"imagename {row['imagename']!r} has texture {texture_category(row['imagename'])!r}, "
                            f"which is not one of the 16 categories {list(CATEGORIES)}")
    return frame.assign(shape=cues["shape"], texture=cues["texture"])


def conflict_trials(responses: Responses) -> "pd.DataFrame":
    """The trials whose shape and texture differ, with ``shape`` and ``texture`` columns added."""
    frame = _concat([_cues(table) for table in _tables(responses)])
    return frame.loc[frame["shape"] != frame["texture"]]


def _fractions(trials: "pd.DataFrame") -> dict[str, float]:
    count = len(trials)
    if count == 0:
        raise ValueError("no cue-conflict trials (every image's shape equals its texture, or no rows)")
    shape = float((trials["object_response"] == trials["shape"]).sum())
    texture = float((trials["object_response"] == trials["texture"]).sum())
    return {"shape": shape / count, "texture": texture / count, "shape_or_texture": (shape + texture) / count,
            "shape_bias": shape / (shape + texture) if shape + texture else float("nan"), "trials": count}


def shape_texture_fractions(responses: Responses) -> dict[str, float]:
    """Fractions of cue-conflict trials decided by shape, by texture, by either; and the shape bias.

    The benchmark divides its ``fraction-correct-shape/texture`` by ALL trials (same-cue ones too);
    here the denominator is the cue-conflict trials, so ``shape_or_texture`` is a proper fraction.
    """
    return _fractions(conflict_trials(responses))


def shape_bias(responses: Responses) -> float:
    """Shape decisions / (shape + texture decisions) over the cue-conflict trials (NaN if there are none)."""
    return shape_texture_fractions(responses)["shape_bias"]


def shape_or_texture_fraction(responses: Responses) -> float:
    """Fraction of cue-conflict trials whose decision is the shape or the texture category."""
    return shape_texture_fractions(responses)["shape_or_texture"]


def category_shape_bias(responses: Responses) -> "pd.Series":
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


def summarize(responses: Responses, by: str = "subj") -> "pd.DataFrame":
    """One row per ``by`` value (a run or subject): shape bias and the shape / texture / either fractions."""
    trials = conflict_trials(responses)
    rows = {key: _fractions(group) for key, group in trials.groupby(by, sort=False)}
    return optional("pandas").DataFrame.from_dict(rows, orient="index").rename_axis(by)
