"""One federated round of local DP-SGD training on a hospital's own images.

Works for any generator (:mod:`common.models.generators`): Opacus'
:class:`~opacus.PrivacyEngine` wraps its private module, optimizer and loader
(Poisson sampling, per-unit clipping, Gaussian noise); the loop itself is an
ordinary PyTorch loop. What makes the site's ε true:

* **Secret randomness.** The Poisson sampling, the Gaussian noise and every
  per-row draw of a DP round come from generators seeded by :mod:`secrets` in
  this process, never from the run's public seed (which fixes only the initial
  model, non-private baselines and evaluation). Opacus' ``secure_mode`` needs
  torchcsprng, which no longer builds; its floating-point mitigation (sum of 4
  draws, Holohan & Braghin 2021) is switched on with our secret generator instead.
* **The patient is the unit.** The private dataset has one row per privacy unit
  (a pseudonymised patient; an image where the source knows no patients). Each
  Poisson-sampled patient contributes one of its images per step, so one
  patient moves at most one clipped row: user-level DP-SGD with q = B / patients.
* **The ledger binds.** The round's steps are reserved in the site's ledger,
  under its lock, before the first step; σ is calibrated against the budget
  that remains, for the rounds that remain.
"""

from __future__ import annotations

import json
import os
import secrets
import warnings
from contextlib import ExitStack
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from opacus.validators import ModuleValidator
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch.utils.data import DataLoader, Dataset, TensorDataset

from common.checks import check_weights
from common.config import RunConfig, SiteConfig
from common.data import SiteData
from common.models.finetune import select_trainable
from common.models.generators import Generator, build_generator
from common.privacy import LOCAL_LOG, BudgetExceeded, PrivacyLedger, warn_unsafe
from common.privacy.bookkeeping import BookkeepingDPOptimizer, BookkeepingModule
from common.runtime import seed_everything, write_json


@dataclass
class RoundResult:
    weights: dict[str, torch.Tensor]
    # What may leave the site: accounted figures (ε, δ, budget), nothing computed from images.
    metrics: dict[str, float] = field(default_factory=dict)
    # Stays at the site (its local log): loss, steps, mechanism parameters.
    local: dict[str, float] = field(default_factory=dict)


def ledger_for(run: RunConfig, site: SiteConfig, state_dir: Path) -> PrivacyLedger:
    assert site.privacy is not None
    return PrivacyLedger(state_dir / "privacy_ledger.json", site.privacy.epsilon, site.privacy.delta, run.training.accountant)


def secret_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator seeded from the OS's CSPRNG: nobody outside this process can re-derive its draws."""
    return torch.Generator(device=device).manual_seed(secrets.randbits(64))


class UnitDataset(Dataset):
    """One row per privacy unit; each draw returns one of the unit's images (uniformly).

    Poisson sampling over rows then samples *patients*, and per-row clipping clips each
    patient's whole contribution to a step. Which image a patient shows is not secret:
    the guarantee holds for any choice (Rényi divergence is jointly quasi-convex).
    """

    def __init__(self, tensors: list[torch.Tensor], groups: list[np.ndarray]):
        self.tensors, self.groups = tensors, groups

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int):
        group = self.groups[i]
        j = int(group[torch.randint(len(group), (1,)).item()])
        return tuple(t[j] for t in self.tensors)


def private_dataset(data: SiteData, tensors: list[torch.Tensor]) -> Dataset:
    if data.max_records_per_unit <= 1:
        return TensorDataset(*tensors)  # every image its own unit: the plain dataset
    return UnitDataset(tensors, data.unit_groups())


def train_round(
    run: RunConfig,
    site: SiteConfig,
    data: SiteData,
    global_weights: dict[str, torch.Tensor],
    server_round: int,
    state_dir: Path,
    device: torch.device,
    build: Callable[[RunConfig], Generator] | None = None,
    note: dict | None = None,
) -> RoundResult:
    """Train ``run.training.local_steps`` steps from ``global_weights``.

    ``build`` makes the model (default: the configured generator); the privacy audit
    passes its gradient-canary probe so that it exercises this very mechanism. ``note`` is
    added to the site's local log entry (e.g. which Ray node ran a simulated site's round).

    Raises :class:`~common.privacy.PrivacyRefusal` *before* touching the data when the
    steps would exceed the site's ε budget or its ledger cannot be trusted.
    """
    cfg = run.training
    torch.set_num_threads(cfg.threads_per_client)
    if cfg.dp:
        # Every per-row draw (timesteps, diffusion noise, label dropout, latents, which slice a
        # patient shows) is secret too: a public stream assigned by batch position would let one
        # added patient shift every other row's draws, past the sensitivity C the accountant assumes.
        seed_everything(secrets.randbits(64))
    else:  # a non-private simulation baseline stays reproducible from the run seed
        seed_everything(run.seed + 10_007 * server_round + sum(map(ord, site.name)))

    gen = build(run) if build else build_generator(run.model)
    check_weights(global_weights, gen.state_dict(), f"round {server_round} global model")
    gen.load_state_dict(global_weights)
    gen.to(device).train()
    gen.batch_size = cfg.batch_size
    # Only the chosen parameters train (and get noise); the rest stay the global model's.
    trained = select_trainable(gen.modules[gen.private], cfg.trainable)
    optimizers = gen.optimizers(cfg.lr)
    private = gen.private_module(cfg.noise_multiplicity)
    # Parameters of the wrapped module that are not trained (the noise-multiplicity anchor)
    # still belong to the DP optimizer, so that Opacus clears their per-sample gradients.
    owned = {id(p) for g in optimizers[gen.private].param_groups for p in g["params"]}
    extra = [p for p in private.parameters() if id(p) not in owned]
    if extra:
        optimizers[gen.private].add_param_group({"params": extra, "lr": 0.0})
    tensors = [data.train_x, data.train_y]
    if run.model.mask_channels:
        if data.train_masks is None:
            raise ValueError(f"site {site.name}: model.mask_channels > 0 but the site's scans have no masks")
        tensors.append(data.train_masks)

    if not cfg.dp:
        warnings.warn(f"site {site.name}: training WITHOUT differential privacy (training.dp = false)", UserWarning)
        loader = DataLoader(TensorDataset(*tensors), batch_size=cfg.batch_size, shuffle=True)
        losses = _train_loop(gen, private, optimizers, loader, cfg, device, virtual=False)
        return _result(gen, site, state_dir, server_round, losses, {}, {"steps": cfg.local_steps, "trained_parameters": trained, **(note or {})})

    if server_round > cfg.rounds:
        raise BudgetExceeded(f"round {server_round} is past the {cfg.rounds} rounds this site's noise was planned for")
    dataset = private_dataset(data, tensors)
    units = len(dataset)
    # q from the *declared* (public) unit count when the site declares one, so that ε reveals
    # nothing about how many patients it holds; else from the true count (then ε reveals it).
    public_units = site.privacy.units or units
    warn_unsafe(site.privacy.epsilon, site.privacy.delta, units)
    ledger = ledger_for(run, site, state_dir)
    with ledger.session():
        q = min(1.0, cfg.batch_size / public_units)
        rounds_left = max(1, cfg.rounds - server_round + 1)
        sigma = ledger.noise_for_remaining(q, cfg.local_steps, rounds_left)
        ledger.reserve(server_round, sigma, q, cfg.local_steps)  # counted before the first step
        private, loader = privatize(gen, private, optimizers, dataset, cfg, sigma, q, device)
        virtual = bool(cfg.max_physical_batch_size and cfg.max_physical_batch_size < cfg.batch_size)
        losses = _train_loop(gen, private, optimizers, loader, cfg, device, virtual)
        ledger.commit(server_round)
        spent = ledger.spent
    shared = {"epsilon": spent, "epsilon_budget": ledger.epsilon_budget, "delta": ledger.delta}
    local = {"steps": cfg.local_steps, "noise_multiplier": sigma, "sample_rate": q, "privacy_units": units, "trained_parameters": trained,
             **(note or {})}
    return _result(gen, site, state_dir, server_round, losses, shared, local)


def privatize(gen: Generator, private: torch.nn.Module, optimizers: dict, dataset: Dataset, cfg, sigma: float, q: float,
              device: torch.device) -> tuple[torch.nn.Module, DataLoader]:
    """Opacus' DP-SGD around the private module: Poisson sampling at exactly ``q`` and Gaussian
    noise ``sigma x C``, both from secret generators, per-sample clipping at C. Replaces
    ``optimizers[gen.private]`` with the DP optimizer; returns the wrapped module and the loader.
    The benchmark (benchmarks/generators.py) times this very function."""
    # Poisson sampling at exactly q, from a secret generator (Opacus' own wrapper would use 1/len(loader)).
    loader = DPDataLoader(dataset, sample_rate=q, generator=secret_generator("cpu"))
    if cfg.grad_sample_mode == "bookkeeping" and cfg.noise_multiplicity == 1:
        ModuleValidator.validate(private, strict=True)  # as make_private: no layer that mixes rows (BatchNorm)
        private = BookkeepingModule(private)
        optimizers[gen.private] = BookkeepingDPOptimizer(
            optimizers[gen.private], private, noise_multiplier=sigma, max_grad_norm=cfg.max_grad_norm,
            expected_batch_size=cfg.batch_size, loss_reduction="mean", generator=secret_generator(device))
        optimizers[gen.private].secure_mode = True  # noise as a sum of draws, as below
        return private, loader
    with warnings.catch_warnings():
        # "Secure RNG turned off": we pass secret generators for sampling and noise ourselves.
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
        engine = PrivacyEngine(accountant=cfg.accountant)
    private, optimizers[gen.private], loader = engine.make_private(
        module=private,
        optimizer=optimizers[gen.private],
        data_loader=loader,  # already Poisson: left as it is
        noise_multiplier=sigma,
        max_grad_norm=cfg.max_grad_norm,
        poisson_sampling=False,
        noise_generator=secret_generator(device),
        # Noise multiplicity needs per-sample gradients of the whole wrapper (functorch).
        grad_sample_mode="functorch" if cfg.noise_multiplicity > 1 else cfg.grad_sample_mode,
    )
    optimizers[gen.private].secure_mode = True  # noise as a sum of draws: the floating-point attack fix
    optimizers[gen.private].expected_batch_size = cfg.batch_size  # normalise by a public constant
    return private, loader


def _train_loop(gen, private, optimizers, loader, cfg, device, virtual: bool) -> list[float]:
    with warnings.catch_warnings():
        # With the first layers frozen (training.trainable), no input needs a gradient: expected.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        return _steps(gen, private, optimizers, loader, cfg, device, virtual)


def _steps(gen, private, optimizers, loader, cfg, device, virtual: bool) -> list[float]:
    losses: list[float] = []
    steps = 0
    private_opt = optimizers[gen.private]
    bf16 = use_bf16(cfg, device)
    with ExitStack() as stack:
        if virtual:  # one logical (accounted) step = several physical batches
            loader = stack.enter_context(
                BatchMemoryManager(data_loader=loader, max_physical_batch_size=cfg.max_physical_batch_size, optimizer=private_opt)
            )
        batches = iter(loader)
        while steps < cfg.local_steps:
            try:
                x, y, *m = next(batches)
            except StopIteration:
                batches = iter(loader)
                continue
            if len(x) == 0:  # Poisson sampling drew nobody: the step still releases noise, and counts
                if cfg.dp:
                    noise_only_step(private_opt)
                steps += 1
                continue
            masks = m[0].to(device) if m else None
            with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
                losses.append(gen.train_step(private, optimizers, x.to(device), y.to(device), masks)["train_loss"])
            steps += 0 if getattr(private_opt, "_is_last_step_skipped", False) else 1
    return losses


def use_bf16(cfg, device: torch.device | str) -> bool:
    """Whether a step runs under bf16 autocast (``training.mixed_precision``); never for Opacus'
    hooks or functorch under DP, which would clip bf16 per-sample gradients."""
    device = torch.device(device)  # callers pass "cpu" as well as a torch.device
    safe = not cfg.dp or cfg.grad_sample_mode == "bookkeeping"
    if cfg.mixed_precision == "bf16":
        return safe
    return cfg.mixed_precision == "auto" and safe and device.type == "cuda" and torch.cuda.is_bf16_supported()


def noise_only_step(optimizer) -> None:
    """An empty Poisson batch: the DP optimizer still adds noise and steps, as the accountant assumes."""
    optimizer.zero_grad()
    for p in optimizer.params:
        if isinstance(optimizer, DPOptimizerFastGradientClipping):  # it reads the clipped sum from p.grad
            p.grad = torch.zeros_like(p)
        else:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    optimizer.step()
    optimizer.zero_grad()


def _result(gen, site, state_dir: Path, server_round: int, losses: list[float], shared: dict, local: dict) -> RoundResult:
    weights = {k: v.detach().cpu().clone() for k, v in gen.state_dict().items()}
    for key, value in weights.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise FloatingPointError(f"site {site.name}: local update {key} is not finite; not sending it")
    finite = [v for v in losses if v == v]
    local = {**local, "train_loss": sum(finite) / max(1, len(finite))}
    append_local_log(state_dir, {"round": server_round, "kind": "train", **local, **shared})
    return RoundResult(weights, shared, local)


def append_local_log(state_dir: Path, entry: dict) -> None:
    """The site's own record of what only it may see (losses, mechanism parameters); owner-only.
    A damaged log is set aside, never allowed to lose a round that was already trained."""
    path = Path(state_dir) / LOCAL_LOG
    try:
        entries = json.loads(path.read_text()) if path.exists() else []
        if not isinstance(entries, list):
            raise ValueError("not a list")
    except (OSError, ValueError):
        path.replace(path.with_suffix(f".damaged-{secrets.token_hex(4)}.json"))
        entries = []
    entries.append(entry)
    write_json(path, entries)
    os.chmod(path, 0o600)


def heldout_loss(run: RunConfig, data: SiteData, weights: dict[str, torch.Tensor], device: torch.device, max_images: int = 256) -> float:
    """The global model's own loss on this site's held-out images (fixed seeds). Stays at the site."""
    gen = build_generator(run.model)
    gen.load_state_dict(weights)
    return float(-gen.membership_scores(data.holdout_x[:max_images], data.holdout_y[:max_images], run.seed, device).mean())
