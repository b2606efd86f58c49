"""A Gaussian process over architectures, the model of what training would give that dsnas's sampler
(dsnas.sampler) fits on the trained candidates. An architecture is its choices, encoded one dimension per numeric
choice (its option's rank, scaled to [0, 1]: wider and deeper are near each other) and one-hot per categorical one
(any two operations equally far apart), and, for choices that share one set of options (a cell's edges, the
layers' precisions), how often each option is chosen among them (Encoding.bags); each choice and each bag has its
own length scale (ARD), so a choice that does not matter stops mattering. Matern-5/2 kernel, fitted by maximizing
the marginal likelihood; exact inference, which is cheap at the few hundred trained candidates a search has."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

BAG_MEMBERS = 3  # categorical choices sharing their options that make a bag (see Encoding.bags)
ABSENT = object()  # a parameter the architecture does not have (a layer beyond its depth)


@dataclass(frozen=True)
class Encoding:
    """Choices (parameter name -> options) to columns of a design matrix, and which columns each choice owns."""

    names: tuple[str, ...]
    options: tuple[tuple[Any, ...], ...]
    numeric: tuple[bool, ...]

    @classmethod
    def of(cls, choices: dict[str, Sequence[Any]]) -> Encoding:
        names = tuple(choices)
        options = tuple(tuple(choices[n]) for n in names)
        numeric = tuple(all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in opts) and len(opts) > 2
                        for opts in options)
        return cls(names, options, numeric)

    @cached_property  # the choices are fixed: worked out once
    def bags(self) -> list[tuple[int, ...]]:
        """Categorical choices that share one set of options, at least BAG_MEMBERS of them (a cell's edges, each
        one of the same operations; the layers' precisions), by index: each such bag also gets columns of how often
        each option is chosen among its members. What a cell can do depends much on how many convolutions it has,
        wherever they are, which one-hot columns alone make the model learn edge by edge: on 6 edges of 5
        operations with 40 cells trained, the held-out error of such a function fell from 20-32% of its variance
        to 6-7% (tests/test_sampler.py). On NAS-Bench-201 the evaluations to reach 90% and 95% of the front fell
        by 5-11% on the seeds it was tried on, and stayed about the same on the benchmark's own seeds
        (docs/search-strategy.md)."""
        shared: dict[tuple[str, ...], list[int]] = {}
        for i, (opts, numeric) in enumerate(zip(self.options, self.numeric)):
            if not numeric:
                shared.setdefault(tuple(repr(v) for v in opts), []).append(i)
        return [tuple(members) for members in shared.values() if len(members) >= BAG_MEMBERS]

    @cached_property
    def groups(self) -> list[slice]:
        """The columns of each choice (one for a numeric choice, one per option for a categorical one), then
        those of each bag (one per option)."""
        widths = [1 if numeric else len(opts) for opts, numeric in zip(self.options, self.numeric)]
        widths += [len(self.options[members[0]]) for members in self.bags]
        out, start = [], 0
        for width in widths:
            out.append(slice(start, start + width))
            start += width
        return out

    @cached_property
    def width(self) -> int:
        return self.groups[-1].stop if self.names else 0

    def encode(self, rows: Sequence[dict[str, Any]]) -> np.ndarray:
        """One row per architecture's parameters; a missing parameter (a layer it does not have) is all zeros, a
        state of its own."""
        x = np.zeros((len(rows), self.width))
        for g, (name, opts, numeric, cols) in enumerate(zip(self.names, self.options, self.numeric, self.groups)):
            # a numeric option's rank by value, not its place in the file: [128, 32, 64] puts 64 between the two
            index = {repr(v): i for i, v in enumerate(sorted(opts) if numeric else opts)}
            for r, row in enumerate(rows):
                if name not in row:
                    if numeric:
                        x[r, cols.start] = -0.5  # away from every option
                    continue
                i = index[repr(row[name])]
                if numeric:
                    x[r, cols.start] = i / (len(opts) - 1)
                else:
                    x[r, cols.start + i] = math.sqrt(0.5)  # two different options: distance 1
        for members, cols in zip(self.bags, self.groups[len(self.names):]):  # a missing member counts as no option
            x[:, cols] = sum(x[:, self.groups[m]] for m in members) / len(members)
        return x


class GaussianProcess:
    """Exact GP regression with one length scale per choice; ``fit`` learns the hyperparameters (warm-started
    from the last fit), ``condition`` only refactors with new data under the hyperparameters it has."""

    def __init__(self, encoding: Encoding) -> None:
        self.encoding = encoding
        self.groups = encoding.groups
        self.log_scales = np.full(len(self.groups), math.log(0.7))
        self.log_signal = 0.0
        self.log_noise = math.log(1e-2)
        self.x: Any = None
        self.mean = self.std = 0.0
        self._chol: Any = None  # torch tensors, once conditioned
        self._alpha: Any = None

    def fit(self, x: np.ndarray, y: np.ndarray, iterations: int = 40, most: int = 300) -> None:
        """Hyperparameters by L-BFGS on the log marginal likelihood (with weak priors that keep length scales
        and noise in sensible ranges on few points), then condition on the data. The hyperparameters are learned
        on ``most`` points at most (a fixed random subset): a few hundred pin them down as well as all, at a
        fraction of the cubic cost."""
        subset = np.arange(len(y))
        if len(y) > most:
            subset = np.sort(np.random.RandomState(len(y)).choice(len(y), most, replace=False))
        with one_thread():
            self._fit(x[subset], np.asarray(y)[subset], iterations)
        self.condition(x, y)

    def _fit(self, x: np.ndarray, y: np.ndarray, iterations: int) -> None:
        import torch

        xt = torch.as_tensor(x, dtype=torch.float64)
        yt = torch.as_tensor(self._standardize(y), dtype=torch.float64)
        params = torch.tensor([*self.log_scales, self.log_signal, self.log_noise], dtype=torch.float64,
                              requires_grad=True)
        optimizer = torch.optim.LBFGS([params], max_iter=iterations, line_search_fn="strong_wolfe")

        def loss() -> Any:
            optimizer.zero_grad()
            value = -self._log_likelihood(xt, yt, params) - self._log_prior(params)
            value.backward()
            return value

        try:
            optimizer.step(loss)
        except RuntimeError:  # a Cholesky that failed mid-search: keep the hyperparameters of the last fit
            pass
        else:
            found = params.detach().numpy()
            if np.all(np.isfinite(found)):
                k = len(self.groups)
                self.log_scales = np.clip(found[:k], math.log(0.05), math.log(20.0))
                self.log_signal = float(np.clip(found[k], -5.0, 5.0))
                self.log_noise = float(np.clip(found[k + 1], math.log(1e-6), math.log(1.0)))

    def condition(self, x: np.ndarray, y: np.ndarray) -> None:
        """The posterior given (x, y) under the current hyperparameters."""
        import torch

        z = torch.as_tensor(self._standardize(y), dtype=torch.float64)
        with one_thread():
            xt = torch.as_tensor(x, dtype=torch.float64)
            k = self._kernel(xt, xt) + (math.exp(self.log_noise) + 1e-8) * torch.eye(len(x), dtype=torch.float64)
            self._chol = torch.linalg.cholesky(k)
            self._alpha = torch.cholesky_solve(z[:, None], self._chol)[:, 0]
        self.x = xt

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and standard deviation of the function (not of a noisy observation), in y's units."""
        import torch

        if self._chol is None:
            raise RuntimeError("predict before condition")
        with one_thread():
            ks = self._kernel(torch.as_tensor(x, dtype=torch.float64), self.x)
            mean = (ks @ self._alpha).numpy()
            v = torch.linalg.solve_triangular(self._chol, ks.T, upper=False)
            var = (math.exp(self.log_signal) - (v * v).sum(0)).clamp_min(1e-12).numpy()
        return self.mean + self.std * mean, self.std * np.sqrt(var)

    def _standardize(self, y: np.ndarray) -> np.ndarray:
        self.mean = float(np.mean(y))
        self.std = float(np.std(y)) or 1.0
        return (np.asarray(y, dtype=float) - self.mean) / self.std

    def _kernel(self, a: Any, b: Any) -> Any:
        import torch

        inverse = torch.exp(-torch.as_tensor(self.log_scales, dtype=torch.float64)[self._column_group()])
        return _matern(a, b, inverse, math.exp(self.log_signal))

    def _log_likelihood(self, x: Any, y: Any, params: Any) -> Any:
        import torch

        k = len(self.groups)
        cov = _matern(x, x, torch.exp(-params[self._column_group()]), torch.exp(params[k]))
        cov = cov + (torch.exp(params[k + 1]) + 1e-8) * torch.eye(len(x), dtype=torch.float64)
        chol = torch.linalg.cholesky(cov)
        alpha = torch.cholesky_solve(y[:, None], chol)[:, 0]
        return -0.5 * y @ alpha - torch.log(torch.diagonal(chol)).sum() - 0.5 * len(x) * math.log(2 * math.pi)

    def _column_group(self) -> Any:
        """Each column's choice (its length scale's index)."""
        import torch

        return torch.tensor([g for g, cols in enumerate(self.groups) for _ in range(cols.stop - cols.start)])

    @staticmethod
    def _log_prior(params: Any) -> Any:
        """Log-normal around a length scale of 0.7 (between "every choice matters" and "none does"), unit signal,
        and a noise that prefers to be small: what keeps the first fits, on ten-odd points, from collapsing."""
        k = params.numel() - 2
        scales = params[:k]
        return (-0.5 * ((scales - math.log(0.7)) / 1.0) ** 2).sum() - 0.5 * (params[k] / 1.5) ** 2 \
            - 0.5 * ((params[k + 1] - math.log(1e-3)) / 3.0) ** 2


@contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one core: these matrices are small, where more threads only wait on each other (a 30 x 30
    Cholesky took 7 ms on two threads and 8 us on one), and the driver must leave the cores to the trials."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _matern(a: Any, b: Any, inverse_scale: Any, signal: Any) -> Any:
    """Matern-5/2 covariance; scaling the columns by 1 / length scale first makes the distance one product."""
    import torch

    sa, sb = a * inverse_scale, b * inverse_scale
    d2 = ((sa * sa).sum(1)[:, None] + (sb * sb).sum(1)[None, :] - 2 * sa @ sb.T).clamp_min(0.0)
    r = math.sqrt(5) * torch.sqrt(d2 + 1e-12)
    return signal * (1 + r + r * r / 3) * torch.exp(-r)
