"""Validate: schema and data-quality rules. A violation stops the run naming column and rule."""

from typing import Any

import pandas as pd

from driftloop.core.errors import DataValidationError

__all__ = ["infer_schema", "validate_frames", "feature_columns", "data_summary_markdown", "SPARSE_NOTE"]

SPARSE_NOTE = 0.3  # the data summary names columns with more gaps than this (a note, never a stop)


def feature_columns(df: pd.DataFrame, target: str, time_column: str | None = None) -> tuple[list[str], list[str]]:
    """Split the feature columns into (numeric, categorical). Booleans count as categorical."""
    numeric, categorical = [], []
    for col in df.columns:
        if col in (target, time_column):
            continue
        s = df[col]
        if pd.api.types.is_bool_dtype(s):
            categorical.append(col)
        elif pd.api.types.is_numeric_dtype(s):
            numeric.append(col)
        elif pd.api.types.is_datetime64_any_dtype(s):
            raise DataValidationError(
                f"column {col!r}: datetime features are not supported (name it data.time_column or drop it)",
                column=col, rule="dtype",
            )
        else:
            values = s.dropna()
            kinds = {type(v).__name__ for v in values.head(10_000)}
            if kinds - {"str"}:
                raise DataValidationError(
                    f"column {col!r}: mixed value types {sorted(kinds)}; expected numbers or strings",
                    column=col, rule="dtype",
                )
            categorical.append(col)
    return numeric, categorical


def infer_schema(df: pd.DataFrame, target: str, task: str, time_column: str | None = None) -> dict[str, Any]:
    """The training schema: feature kinds, numeric ranges, categorical levels, target classes."""
    numeric, categorical = feature_columns(df, target, time_column)
    schema: dict[str, Any] = {
        "target": target,
        "task": task,
        "time_column": time_column,
        "numeric": numeric,
        "categorical": categorical,
        "ranges": {c: [float(df[c].min()), float(df[c].max())] for c in numeric if df[c].notna().any()},
        "levels": {c: sorted(map(str, df[c].dropna().unique()))[:1000] for c in categorical},
    }
    if task == "classification":
        schema["classes"] = sorted(df[target].dropna().unique().tolist())
    return schema


def _check_target(df: pd.DataFrame, target: str, task: str, split: str) -> None:
    if target not in df.columns:
        raise DataValidationError(f"target column {target!r} is missing from the {split} split", column=target, rule="target_present")
    missing = int(df[target].isna().sum())
    if missing:
        raise DataValidationError(f"target column {target!r} has {missing} missing values in the {split} split", column=target, rule="target_missing")
    if task == "regression" and not pd.api.types.is_numeric_dtype(df[target]):
        raise DataValidationError(
            f"target column {target!r} must be numeric for regression (dtype {df[target].dtype})", column=target, rule="dtype"
        )


def _check_gaps(col: str, train: pd.Series, test: pd.Series, rule: dict[str, Any], max_missing: float,
                max_missing_increase: float) -> None:
    """Gaps stop a run when the column has nothing to learn from, when they pass the column's (or the default)
    max_missing, or when the test split (the newest rows under a time column) has many more than training."""
    limit = rule.get("max_missing")
    explicit_empty_ok = limit is not None and limit >= 1.0
    limit = max_missing if limit is None else limit
    train_share, test_share = float(train.isna().mean()), float(test.isna().mean())
    if train_share >= 1.0 and not explicit_empty_ok:
        raise DataValidationError(
            f"column {col!r} has no values in the training split (remove it from the source, or accept it with "
            f"validation.columns.{col}.max_missing: 1.0)", column=col, rule="empty",
        )
    share = float(pd.concat([train, test], ignore_index=True).isna().mean())
    if share > limit:
        raise DataValidationError(
            f"column {col!r}: {share:.1%} missing values exceeds max_missing {limit:.1%}", column=col, rule="max_missing"
        )
    increase = rule.get("max_missing_increase")
    increase = max_missing_increase if increase is None else increase
    if test_share - train_share > increase:
        raise DataValidationError(
            f"column {col!r}: {test_share:.1%} missing in the test split against {train_share:.1%} in training, "
            f"more than max_missing_increase {increase:.1%} (did the feed break?)", column=col, rule="max_missing_increase",
        )


def validate_frames(
    train: pd.DataFrame,
    test: pd.DataFrame,
    *,
    target: str,
    task: str,
    time_column: str | None = None,
    max_missing: float = 1.0,
    max_missing_increase: float = 0.3,
    max_unseen_share: float = 0.05,
    columns: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Check schema and quality; return the training schema. Raises DataValidationError on the first violation."""
    columns = columns or {}
    for split, frame in (("train", train), ("test", test)):
        _check_target(frame, target, task, split)
    unknown = set(columns) - set(train.columns)
    if unknown:
        col = sorted(unknown)[0]
        raise DataValidationError(f"column {col!r} has quality rules but is not in the data", column=col, rule="column_present")
    if list(train.columns) != list(test.columns):
        missing = [c for c in train.columns if c not in test.columns]
        col = missing[0] if missing else str(test.columns[0])
        raise DataValidationError(f"column {col!r}: train and test splits have different columns", column=col, rule="schema")
    schema = infer_schema(train, target, task, time_column)
    if not schema["numeric"] and not schema["categorical"]:
        raise DataValidationError("the data has no feature columns besides the target", column=target, rule="schema")
    if task == "classification" and len(schema["classes"]) < 2:
        raise DataValidationError(
            f"target column {target!r} has a single class ({schema['classes'][0]!r}) in the training split; need at least two",
            column=target, rule="classes",
        )
    for col in schema["numeric"]:
        if not pd.api.types.is_numeric_dtype(test[col]):
            raise DataValidationError(f"column {col!r}: numeric in train but {test[col].dtype} in test", column=col, rule="dtype")
    both = pd.concat([train, test], ignore_index=True)
    for col in schema["numeric"] + schema["categorical"]:
        rule = columns.get(col, {})
        _check_gaps(col, train[col], test[col], rule, max_missing, max_missing_increase)
        values = both[col].dropna()
        if rule.get("min") is not None and col in schema["numeric"] and (values < rule["min"]).any():
            raise DataValidationError(
                f"column {col!r}: {int((values < rule['min']).sum())} values below min {rule['min']} (lowest {values.min()})",
                column=col, rule="min",
            )
        if rule.get("max") is not None and col in schema["numeric"] and (values > rule["max"]).any():
            raise DataValidationError(
                f"column {col!r}: {int((values > rule['max']).sum())} values above max {rule['max']} (highest {values.max()})",
                column=col, rule="max",
            )
        if rule.get("allowed") is not None:
            bad = sorted(set(map(str, values.unique())) - set(map(str, rule["allowed"])))
            if bad:
                raise DataValidationError(f"column {col!r}: levels {bad[:5]} are not in the allowed list", column=col, rule="allowed")
    for col in schema["categorical"]:
        seen = set(schema["levels"][col])
        test_values = test[col].dropna().astype(str)
        if len(test_values):
            unseen = ~test_values.isin(seen)
            share = float(unseen.mean())
            if share > max_unseen_share:
                levels = sorted(test_values[unseen].unique())[:5]
                raise DataValidationError(
                    f"column {col!r}: {share:.1%} of test rows have levels never seen in training {levels} "
                    f"(max_unseen_share {max_unseen_share:.1%})",
                    column=col, rule="unseen_levels",
                )
    return schema


def data_summary_markdown(train: pd.DataFrame, test: pd.DataFrame, schema: dict[str, Any]) -> str:
    """The validated data as a person reads it in the Kubeflow UI: per column its kind, gaps, range or levels,
    and the test split's levels never seen in training."""

    def gaps(col: str) -> str:  # train / test: a jump in the newest rows is what a broken feed looks like
        return f"{float(train[col].isna().mean()):.1%} / {float(test[col].isna().mean()):.1%}"

    lines = [
        "# Data summary",
        "",
        f"{len(train)} training rows, {len(test)} test rows; target `{schema['target']}` ({schema['task']})"
        + (f", classes {', '.join(map(str, schema['classes']))}" if schema.get("classes") else "")
        + (f"; time column `{schema['time_column']}`" if schema.get("time_column") else "") + ".",
        "",
        "| column | kind | missing (train / test) | range / levels | unseen in test |",
        "| --- | --- | ---: | --- | --- |",
    ]
    for col in schema["numeric"]:
        lo_hi = schema["ranges"].get(col)
        span = f"{lo_hi[0]:.4g} .. {lo_hi[1]:.4g}" if lo_hi else "(all missing)"
        lines.append(f"| `{col}` | numeric | {gaps(col)} | {span} | |")
    for col in schema["categorical"]:
        levels = schema["levels"][col]
        shown = ", ".join(levels[:8]) + (f" … ({len(levels)} levels)" if len(levels) > 8 else "")
        test_values = test[col].dropna().astype(str)
        unseen = sorted(set(test_values.unique()) - set(levels))
        unseen_text = (f"{', '.join(unseen[:5])} ({float((~test_values.isin(levels)).mean()):.1%} of rows)"
                       if unseen else "none")
        lines.append(f"| `{col}` | categorical | {gaps(col)} | {shown} | {unseen_text} |")
    both = pd.concat([train, test], ignore_index=True)
    sparse = [f"`{c}` ({float(both[c].isna().mean()):.0%})" for c in schema["numeric"] + schema["categorical"]
              if float(both[c].isna().mean()) > SPARSE_NOTE]
    if sparse:
        lines += ["", f"Sparse columns (over {SPARSE_NOTE:.0%} missing; the model imputes their gaps): {', '.join(sparse)}."]
    return "\n".join(lines) + "\n"
