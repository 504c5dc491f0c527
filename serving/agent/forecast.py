"""Request-rate forecasts with prediction intervals, chosen per model by a rolling backtest.

Two families run side by side on the same history (one value per step, requests/s):

* **seasonal-naive**: the value one season ago (no season: the last value -- reactive);
* **Holt-Winters** (additive, damped trend; no season: Holt's linear trend). Its smoothing
  parameters are fitted on the history by statsmodels' ``ExponentialSmoothing`` when the
  ``agent`` extra is installed, else by a vectorised numpy grid search; either way the model
  then runs online in numpy (O(1) per step), which is what the agent and the simulator need.

The season (a day or a week of steps) is found from the autocorrelation of the detrended
history; without one the agent stays reactive. Every model's ``h``-step forecasts are scored
as they come true (mean absolute error over a rolling window) and the best one is used.
Prediction intervals are empirical: quantiles of the selected model's past relative errors
at the same horizon, so their coverage is measured, not assumed.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["SeasonalNaive", "HoltWinters", "fit_holt_winters", "detect_season", "ForecastSelector", "Band",
           "statsmodels_available"]

log = logging.getLogger(__name__)

IDLE_RPS = 1.0  # below this on both sides (value and forecast) a step is idle: a closed night, a weekend


def statsmodels_available() -> bool:
    try:
        import statsmodels.tsa.holtwinters  # noqa: F401
    except ImportError:
        return False
    return True


class _Clipper:
    """Robust updates (as Gelper, Fried and Croux's robust exponential smoothing): a value further
    from the model's one-step forecast than ``clip`` times the running mean absolute relative error
    is replaced by its forecast, so a burst is neither followed nor learnt into the season; a lasting
    change (more than ``max_clipped`` steps in a row) is taken as it comes."""

    def __init__(self, clip: float | None = 4.0, max_clipped: int = 30, warmup: int = 100) -> None:
        self.clip, self.max_clipped, self.warmup = clip, max_clipped, warmup
        self.scale: float | None = None
        self.seen = self.clipped = 0

    def clean(self, y: float, pred: float) -> float:
        if not self.clip or abs(pred) < IDLE_RPS:
            return y  # from idle (a closed night, a gap) any load is new, not an outlier: no measure of the spread
        base = max(abs(pred), 1.0)
        rel = (y - pred) / base
        bound = self.clip * self.scale if self.scale else math.inf
        self.seen += 1
        out = y
        if abs(rel) > bound and self.seen > self.warmup and self.clipped < self.max_clipped:
            self.clipped += 1
            out = pred
        else:
            self.clipped = 0
        err = min(abs(rel), bound)
        self.scale = err if self.scale is None else 0.98 * self.scale + 0.02 * err
        return out


class SeasonalNaive:
    """y(t+h) = y(t+h-m·k), the same step of the last season; ``m`` None: the last value.
    What it stores is cleaned of outliers (:class:`_Clipper`), so a burst is not repeated a season later."""

    def __init__(self, m: int | None, clip: float | None = 4.0) -> None:
        self.m = m
        self.name = f"seasonal-naive(m={m})" if m else "naive"
        self._ring = np.zeros(m or 1)  # the last season; _next is the oldest value's slot
        self._next = self._seen = 0
        self._clipper = _Clipper(clip)

    def update(self, y: float) -> None:
        if self._seen:
            y = self._clipper.clean(float(y), self.forecast(1))
        self._ring[self._next] = float(y)
        self._next = (self._next + 1) % len(self._ring)
        self._seen += 1

    def _last(self) -> float:
        return float(self._ring[self._next - 1])

    def forecast(self, h: int) -> float:
        if not self._seen:
            return 0.0
        if not self.m or self._seen < self.m:
            return self._last()
        return float(self._ring[(self._next + h - 1) % self.m])  # the value m steps before t+h

    def path(self, hs: np.ndarray) -> np.ndarray:
        """Forecasts for every horizon in ``hs`` at once."""
        if not self._seen:
            return np.zeros(len(hs))
        if not self.m or self._seen < self.m:
            return np.full(len(hs), self._last())
        return self._ring[(self._next + np.asarray(hs) - 1) % self.m]


class HoltWinters:
    """Additive Holt-Winters with a damped trend, updated one value at a time (robustly: see
    :class:`_Clipper`)."""

    def __init__(self, m: int | None, alpha: float, beta: float, gamma: float, phi: float = 0.98,
                 level: float = 0.0, trend: float = 0.0, season: np.ndarray | None = None, t: int = 0,
                 clip: float | None = 4.0) -> None:
        self.m, self.alpha, self.beta, self.gamma, self.phi = m, alpha, beta, gamma, phi
        self._clipper = _Clipper(clip)
        self.level, self.trend = level, trend
        self.season = [float(v) for v in (season if season is not None else [0.0] * (m or 1))]
        self._damp = [0.0]
        for k in range(1, 64):
            self._damp.append(self._damp[-1] + phi ** k)
        self.t = t  # steps seen; season index of the next value = t % m
        self.name = f"holt-winters(m={m})" if m else "holt"

    def update(self, y: float) -> None:
        y = self._clipper.clean(y, self.forecast(1))
        m = self.m or 1
        i = self.t % m
        s = self.season[i] if self.m else 0.0
        prev = self.level
        self.level = self.alpha * (y - s) + (1 - self.alpha) * (prev + self.phi * self.trend)
        self.trend = self.beta * (self.level - prev) + (1 - self.beta) * self.phi * self.trend
        if self.m:
            self.season[i] = self.gamma * (y - self.level) + (1 - self.gamma) * s
        self.t += 1

    def _damping(self, h: int) -> float:
        return self._damp[h] if h < len(self._damp) else self.phi * (1 - self.phi ** h) / (1 - self.phi)

    def forecast(self, h: int) -> float:
        s = self.season[(self.t + h - 1) % self.m] if self.m else 0.0
        return float(self.level + self._damping(h) * self.trend + s)

    def path(self, hs: np.ndarray) -> np.ndarray:
        """Forecasts for every horizon in ``hs`` at once."""
        hs = np.asarray(hs)
        damp = self.phi * (1 - self.phi ** hs) / (1 - self.phi) if self.phi < 1 else hs.astype(float)
        if self.m:
            season = np.array([self.season[i] for i in ((self.t + hs - 1) % self.m).tolist()])
        else:
            season = 0.0
        return self.level + damp * self.trend + season


def _without_bursts(seasons: np.ndarray, window: int = 61, mads: float = 6.0) -> np.ndarray:
    """Each season (row) with its short excursions replaced by its running median over ``window``
    steps: values more than ``mads`` robust scales from it. A running median keeps ramps and steps
    (it follows anything monotone) and drops what is shorter than half the window -- so bursts that
    happen to fall at the same time on two of three days do not become the median season."""
    m = seasons.shape[1]
    if m < 4 * window:
        return seasons
    from numpy.lib.stride_tricks import sliding_window_view

    k = window // 2
    padded = np.concatenate([seasons[:, -k:], seasons, seasons[:, :k]], axis=1)
    smooth = np.median(sliding_window_view(padded, window, axis=1), axis=2)
    rel = (seasons - smooth) / np.maximum(np.abs(smooth), 1.0)
    scale = 1.4826 * np.median(np.abs(rel)) or 1e-9
    return np.where(np.abs(rel) > mads * scale, smooth, seasons)


def _initial_state(y: np.ndarray, m: int | None) -> tuple[float, float, np.ndarray]:
    if not m:
        return float(y[0]), float(y[1] - y[0]) if len(y) > 1 else 0.0, np.zeros(1)
    first, second = y[:m], y[m:2 * m]
    level = float(first.mean())
    trend = float((second.mean() - first.mean()) / m) if len(second) == m else 0.0
    season = (first - level).astype(float)
    if len(y) >= 3 * m:  # the median season of the history: a burst seen on one day is not repeated
        seasons = _without_bursts(y[:len(y) // m * m].reshape(-1, m))
        season = np.median(seasons - seasons.mean(axis=1, keepdims=True), axis=0)
    if m >= 48:  # many steps per season: the profile is smooth, single values are mostly noise,
        k = 5    # so the first season's profile is a centred moving average of 11 steps
        padded = np.concatenate([season[-k:], season, season[:k]])
        season = np.convolve(padded, np.ones(2 * k + 1) / (2 * k + 1), mode="same")[k:-k]
    return level, trend, season.copy()


def _recent_load(history: list[float], alpha: float = 0.5, beta: float = 0.05, phi: float = 0.9) -> HoltWinters:
    """Recent load: Holt's damped linear trend (no season), run over the last few hundred values."""
    tail = history[-300:] if len(history) >= 2 else [*history, *history, 0.0][:2]
    model = HoltWinters(None, alpha, beta, 0.0, phi, level=tail[0], t=1, clip=None)
    model.name = "recent-load"
    for value in tail[1:]:
        model.update(value)
    return model


_STATSMODELS_MAX_SEASON = 2016  # steps: a day of minutes, a week of 5-minute steps
_GRID = [(a, b, g) for a in (0.05, 0.1, 0.3) for b in (0.0, 0.02) for g in (0.05, 0.2, 0.5)]


def _grid_fit(y: np.ndarray, m: int | None, phi: float, extra: list[tuple[float, float, float]] = (),
              clip: float | None = 4.0) -> tuple[tuple[float, float, float], int]:
    """Smoothing parameters with the least one-step squared error among the grid and ``extra``
    (run all at once in numpy); returns them and their index (``>= len(grid)``: one of ``extra``)."""
    grid = _GRID if m else [(a, b, 0.0) for a, b, _ in _GRID[::3]]
    params = np.array([*grid, *extra])
    alpha, beta, gamma = params[:, 0], params[:, 1], params[:, 2]
    k = len(params)
    level0, trend0, season0 = _initial_state(y, m)
    mm = m or 1
    level = np.full(k, level0)
    trend = np.full(k, trend0)
    season = np.tile(season0 if m else np.zeros(1), (k, 1))
    sse = np.zeros(k)
    scale = np.zeros(k)
    start = m or 1
    for n, t in enumerate(range(start, len(y))):
        i = t % mm
        s = season[:, i] if m else 0.0
        pred = level + phi * trend + s
        base = np.maximum(np.abs(pred), 1.0)
        rel = (y[t] - pred) / base
        # the same robust update as HoltWinters (without the run-length limit): outliers neither
        # drive the error the parameters are chosen on nor the state
        bound = clip * scale if clip and n > 100 else np.inf
        idle = np.abs(pred) < IDLE_RPS  # as _Clipper: from idle nothing is clipped nor measured
        outlier = (np.abs(rel) > bound) & ~idle
        step_scale = np.abs(rel) if n == 0 else 0.98 * scale + 0.02 * np.minimum(np.abs(rel), bound)
        scale = np.where(idle, scale, step_scale)
        err = np.where(outlier, bound * base, rel * base)  # an outlier costs what the bound does
        yt = np.where(outlier, pred, y[t])
        sse += err * err
        prev = level
        level = alpha * (yt - s) + (1 - alpha) * (prev + phi * trend)
        trend = beta * (level - prev) + (1 - beta) * phi * trend
        if m:
            season[:, i] = gamma * (yt - level) + (1 - gamma) * s
    best = int(np.argmin(sse))
    return (float(alpha[best]), float(beta[best]), float(gamma[best])), best - len(grid)


def _statsmodels_fit(y: np.ndarray, m: int | None, phi: float) -> tuple[float, float, float]:
    from statsmodels.tsa.holtwinters import ExponentialSmoothing

    model = ExponentialSmoothing(y, trend="add", damped_trend=True, seasonal="add" if m else None,
                                 seasonal_periods=m, initialization_method="heuristic" if m else "estimated")
    fitted = model.fit(damping_trend=phi, optimized=True)
    p = fitted.params
    return (float(p["smoothing_level"]), float(p.get("smoothing_trend") or 0.0),
            float(p.get("smoothing_seasonal") or 0.0))


def fit_holt_winters(history: Sequence[float], m: int | None, *, engine: str = "auto", phi: float = 0.98,
                     max_seasons: int = 4) -> HoltWinters:
    """A Holt-Winters model fitted on ``history`` (its last ``max_seasons`` seasons) and run over all of it.

    ``engine``: ``statsmodels`` (needs the ``agent`` extra), ``numpy`` (grid search) or ``auto``
    (statsmodels' optimum competes with the grid when installed and the season is at most 2016 steps).
    """
    y = np.asarray(history, dtype=float)
    need = 2 * m if m else 3
    if len(y) < need:
        raise ValueError(f"Holt-Winters needs at least {need} values, got {len(y)}")
    tail = y[-max_seasons * m:] if m else y[-2000:]
    tail = tail[len(tail) % m:] if m else tail  # start on a season boundary of the tail
    use_sm = engine == "statsmodels" or (engine == "auto" and statsmodels_available())
    if engine == "statsmodels" and not statsmodels_available():
        raise ValueError("engine 'statsmodels' needs the agent extra: pip install 'driftloop[agent]'")
    extra: list[tuple[float, float, float]] = []
    if engine == "auto" and m and m > _STATSMODELS_MAX_SEASON:
        use_sm = False  # its optimiser takes a minute on a week of minutes; the grid takes a second
    if use_sm and len(tail) >= need:
        try:
            extra.append(_statsmodels_fit(tail, m, phi))
        except Exception as exc:  # an optimiser failure is not fatal: the grid still fits
            log.info("statsmodels fit failed (%s); using the numpy grid", exc)
    # statsmodels' optimum competes with the grid on the same one-step error (its optimiser can
    # stop in a poor local optimum on long seasons); ``engine`` says which one won.
    (alpha, beta, gamma), won = _grid_fit(tail, m, phi, extra)
    if engine == "statsmodels" and extra:
        (alpha, beta, gamma), won = extra[0], 0
    # Run the fitted model over the whole history so its state (level, trend, season) is current:
    # the first season (from a season boundary) initialises it, every later value updates it.
    start = len(y) % m if m else 0
    level, trend, season = _initial_state(y[start:], m)
    model = HoltWinters(m, alpha, beta, gamma, phi, level, trend, season, t=m or 1)
    model.engine = "statsmodels" if won >= 0 else "numpy"  # type: ignore[attr-defined]
    for value in y[start + (m or 1):]:
        model.update(value)
    return model


def detect_season(history: Sequence[float], candidates: Sequence[int], *, min_acf: float = 0.3) -> int | None:
    """The season (in steps) among ``candidates`` with the strongest autocorrelation above ``min_acf``
    in the linearly detrended history (each needs two seasons of it), or None: no season."""
    y = np.asarray(history, dtype=float)
    best, best_acf = None, min_acf
    for m in sorted(set(int(c) for c in candidates if c and c > 1)):
        if len(y) < 2 * m:
            continue
        x = np.arange(len(y))
        resid = y - np.polyval(np.polyfit(x, y, 1), x)
        a, b = resid[:-m], resid[m:]
        denom = math.sqrt(float((a * a).sum() * (b * b).sum())) or 1.0
        acf = float((a * b).sum() / denom)
        # A longer season must explain clearly more than a shorter one (a week repeats days too).
        if acf > best_acf + (0.05 if best is not None else 0.0):
            best, best_acf = m, acf
    return best


@dataclass(frozen=True)
class Band:
    """A forecast for one step and its prediction interval (requests/s)."""

    point: float
    lower: float
    upper: float
    model: str


class ForecastSelector:
    """Runs the candidate models online, scores their ``horizon``-step forecasts on a rolling
    window, and forecasts with the best one. Intervals come from the selected model's own
    relative errors at ``horizon`` (the last ``error_window`` of them).

    A day unlike its season -- a holiday, a storm, an outage -- is noticed within the day: when the
    median ratio of the load to the best seasonal model's one-step forecasts over the last
    ``unlike_steps`` is beyond ``unlike_ratio`` (either way), the selector falls back on recent load
    (Holt's damped linear trend over the last values, :attr:`recent`) until the ratio is back within
    its square root; meanwhile, for at most ``unlike_max_steps``, the seasonal models take their own
    forecast instead of the load, so the odd day is not learnt into the season (a longer change is
    taken as it comes). A median, so a burst shorter than half the window does not count."""

    def __init__(self, history: Sequence[float], *, season_candidates: Sequence[int], horizon: int,
                 level: float = 0.9, engine: str = "auto", score_window: int = 360, error_window: int = 1440,
                 min_acf: float = 0.3, outlier_mads: float = 6.0, unlike_steps: int = 60,
                 unlike_ratio: float = 1.3, unlike_max_steps: int = 1440) -> None:
        if horizon < 1:
            raise ValueError("horizon must be at least 1 step")
        y = [float(v) for v in history]
        self.horizon = horizon
        self.level = level
        self.outlier_mads = outlier_mads
        self.season = detect_season(y, season_candidates, min_acf=min_acf)
        self.models: list[SeasonalNaive | HoltWinters] = []
        naive = SeasonalNaive(self.season)
        for v in y[-(self.season or 1):]:
            naive.update(v)
        self.models.append(naive)
        try:
            self.models.append(fit_holt_winters(y, self.season, engine=engine))
        except ValueError as exc:
            log.info("no Holt-Winters model yet: %s", exc)
        self.engine = getattr(self.models[-1], "engine", "none") if len(self.models) > 1 else "none"
        self.seasonal = len(self.models)  # models[:seasonal] follow the season; the last one recent load
        self.recent = _recent_load(y)
        self.models.append(self.recent)
        self._pending: list[deque[float]] = [deque() for _ in self.models]  # forecasts for t+horizon
        self._abs: list[deque[float]] = [deque() for _ in self.models]
        self._abs_sum = [0.0 for _ in self.models]
        self._score_window = score_window
        self._rel: list[deque[float]] = [deque(maxlen=error_window) for _ in self.models]
        self._ratios: deque[float] = deque(maxlen=unlike_steps)
        self.unlike_ratio, self.unlike_max_steps = unlike_ratio, unlike_max_steps
        self.unlike = False  # today is unlike its season: forecasting recent load
        self._unlike_for = 0
        # Warm the scores on the tail of the history so the first choice is already a backtest.
        self.seasonal_scale = self._scale(y)  # in-sample seasonal-naive error: MASE's denominator
        self.selected = 0
        self._updates = 0
        self._q_cache: tuple[tuple[int, int], tuple[float, float]] | None = None
        self._issue()

    def _scale(self, y: list[float]) -> float:
        m = self.season or 1
        if len(y) <= m:
            return 1.0
        a = np.asarray(y)
        return float(np.mean(np.abs(a[m:] - a[:-m]))) or 1.0

    @property
    def reactive(self) -> bool:
        """No season was found: the floor stays where the policy puts it; the autoscaler reacts."""
        return self.season is None

    def _issue(self) -> None:
        for i, model in enumerate(self.models):
            self._pending[i].append(model.forecast(self.horizon))

    def update(self, y: float) -> None:
        """One new value; forecasts made ``horizon`` steps ago are scored."""
        best = self._best(range(self.seasonal)) if self.season else 0
        ahead = [model.forecast(1) for model in self.models]
        self._judge_day(y, ahead[best])
        keep_season = self.unlike and self._unlike_for <= self.unlike_max_steps
        for i, model in enumerate(self.models):
            pend = self._pending[i]
            if len(pend) >= self.horizon:
                f = pend.popleft()
                # idle steps (closed nights) say nothing of a model's error, nor does an odd day of a seasonal one's
                if max(abs(y), abs(f)) >= IDLE_RPS and not (keep_season and i < self.seasonal):
                    self._abs[i].append(abs(y - f))
                    self._abs_sum[i] += abs(y - f)
                    if len(self._abs[i]) > self._score_window:
                        self._abs_sum[i] -= self._abs[i].popleft()
                    self._rel[i].append((y - f) / max(abs(f), 1.0))
            model.update(ahead[i] if keep_season and i < self.seasonal else y)
        self._updates += 1
        self._issue()
        self.selected = len(self.models) - 1 if self.unlike else self._best(range(self.seasonal))

    def _best(self, candidates: range) -> int:
        """The candidate with the lowest rolling error (the last one until ten errors are measured)."""
        scores = {i: self._abs_sum[i] / len(self._abs[i]) for i in candidates if len(self._abs[i]) >= 10}
        return min(scores, key=scores.__getitem__) if scores else candidates[-1]

    def _judge_day(self, y: float, seasonal: float) -> None:
        if not self.season:
            return
        if max(abs(y), abs(seasonal)) >= IDLE_RPS:
            self._ratios.append(max(y, 0.0) / max(seasonal, IDLE_RPS))
        if len(self._ratios) < self._ratios.maxlen // 2:
            return
        ratio = float(np.median(self._ratios))
        far, near = self.unlike_ratio, math.sqrt(self.unlike_ratio)
        if not self.unlike and (ratio > far or ratio < 1 / far):
            self.unlike, self._unlike_for = True, 0
            log.debug("load at %.2fx its season: forecasting recent load", ratio)
        elif self.unlike and 1 / near <= ratio <= near:
            self.unlike = False
        self._unlike_for += self.unlike

    @property
    def model_name(self) -> str:
        return self.models[self.selected].name

    def _quantiles(self) -> tuple[float, float]:
        key = (self.selected, self._updates)
        if self._q_cache is None or self._q_cache[0] != key:
            self._q_cache = (key, self._measure_quantiles())
        return self._q_cache[1]

    def _measure_quantiles(self) -> tuple[float, float]:
        rel = self._rel[self.selected]
        if len(rel) < 20:
            return -0.25, 0.25  # until errors are measured: a wide, honest default
        r = np.asarray(rel)
        # errors far outside the usual spread (a burst, an outage) say nothing about the next
        # ordinary step: they are left out of the quantiles (coverage is measured on every step)
        med = float(np.median(r))
        mad = float(np.median(np.abs(r - med))) or 1e-9
        r = r[np.abs(r - med) <= self.outlier_mads * mad]
        lo_q, hi_q = np.quantile(r, [(1 - self.level) / 2, 1 - (1 - self.level) / 2])
        return float(lo_q), float(hi_q)

    def bands(self, first: int, last: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Point forecasts and interval bounds for the horizons ``first..last`` at once (arrays);
        the interval is the one measured at the selector's horizon, as in :meth:`band`."""
        hs = np.arange(first, last + 1)
        point = np.maximum(0.0, self.models[self.selected].path(hs))
        lo_q, hi_q = self._quantiles()
        scale = np.maximum(point, 1.0)
        return point, np.maximum(0.0, point + lo_q * scale), np.maximum(0.0, point + hi_q * scale)

    def band(self, h: int | None = None) -> Band:
        """Forecast ``h`` steps ahead (default the horizon) with its interval."""
        h = h or self.horizon
        model = self.models[self.selected]
        point = max(0.0, model.forecast(h))
        lo_q, hi_q = self._quantiles()
        scale = max(point, 1.0)
        return Band(point, max(0.0, point + lo_q * scale), max(0.0, point + hi_q * scale), model.name)
