"""The champion's drift reference on a real table's integer columns (monitoring/reference.py)."""

from types import SimpleNamespace

import pandas as pd

from driftloop.core.config import load_settings
from monitoring.reference import PREDICTION, load_champion_reference


class _Doubles:
    """A model whose MLflow signature says double: like MLflow's schema enforcement, int64 is refused."""

    def predict(self, features: pd.DataFrame) -> list[float]:
        for col in ("high_temp", "low_wind"):
            if features[col].dtype != "float64":
                raise ValueError(f"Incompatible input types for column {col}. Can not safely convert "
                                 f"{features[col].dtype} to float64.")
        return (features["high_temp"] * 2.0).tolist()


class _Registry:
    def resolve(self, ref: str) -> SimpleNamespace:
        return SimpleNamespace(version="1", uri="models:/m/1", run_id="r1")

    def schema(self, ref: str) -> dict:
        return {"numeric": ["high_temp", "low_wind"], "categorical": ["city"], "task": "regression"}

    def reference_sample(self, ref: str) -> pd.DataFrame:
        # as a table with whole numbers is stored: int64 beside a float column with gaps
        return pd.DataFrame({"high_temp": [32, 41, 73, 45] * 30, "low_wind": [25.0, None, 40.0, 31.0] * 30,
                             "city": ["Chicago", "Auckland", "Mumbai", "Beijing"] * 30, "rain": ["dry"] * 120})

    def load_pyfunc(self, uri: str) -> _Doubles:
        return _Doubles()


def test_the_reference_of_a_table_with_integer_columns_is_predicted_as_the_servers_send_it(tmp_path):
    settings = load_settings(overrides={"workspace": str(tmp_path)})
    ref = load_champion_reference(settings, _Registry())
    assert ref.frame[PREDICTION].tolist()[:4] == [64.0, 82.0, 146.0, 90.0]
    assert ref.features_numeric == ["high_temp", "low_wind"] and len(ref.frame) == 120
