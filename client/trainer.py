"""One federated round of local DP-SGD training on a hospital's own images.

Works for any generator (:mod:`common.models.generators`): Opacus'
:class:`~opacus.PrivacyEngine` wraps its private module, optimizer and loader
(Poisson sampling, per-sample clipping, Gaussian noise); the loop itself is an
ordinary PyTorch loop. The site's :class:`~common.privacy.PrivacyLedger` is the
engine's accountant, so every optimizer step is accounted and persisted.
"""

from __future__ import annotations

import warnings
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from opacus import PrivacyEngine
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch.utils.data import DataLoader, TensorDataset

from common.config import RunConfig, SiteConfig
from common.data import SiteData
from common.models.generators import build_generator
from common.privacy import PrivacyLedger, calibrate
from common.runtime import seed_everything

from common.checks import check_weights


@dataclass
class RoundResult:
    weights: dict[str, torch.Tensor]
    metrics: dict[str, float] = field(default_factory=dict)


def ledger_for(run: RunConfig, site: SiteConfig, state_dir: Path) -> PrivacyLedger:
    assert site.privacy is not None
    return PrivacyLedger(state_dir / "privacy_ledger.json", site.privacy.epsilon, site.privacy.delta, run.training.accountant)


def train_round(
    run: RunConfig,
    site: SiteConfig,
    data: SiteData,
    global_weights: dict[str, torch.Tensor],
    server_round: int,
    state_dir: Path,
    device: torch.device,
) -> RoundResult:
    """Train ``run.training.local_steps`` steps from ``global_weights``.

    Raises :class:`~common.privacy.BudgetExceeded` *before* touching the data
    when the steps would exceed the site's ε budget.
    """
    cfg = run.training
    torch.set_num_threads(cfg.threads_per_client)
    seed_everything(run.seed + 10_007 * server_round + sum(map(ord, site.name)))

    gen = build_generator(run.model)
    check_weights(global_weights, gen.state_dict(), f"round {server_round} global model")
    gen.load_state_dict(global_weights)
    gen.to(device).train()
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
    loader = DataLoader(TensorDataset(*tensors), batch_size=cfg.batch_size, shuffle=True)
    metrics: dict[str, float] = {}

    if cfg.dp:
        plan = calibrate(
            site.privacy.epsilon,
            site.privacy.delta,
            num_examples=len(data.train_x),
            batch_size=cfg.batch_size,
            steps_per_round=cfg.local_steps,
            rounds=cfg.rounds,
            accountant=cfg.accountant,
        )
        ledger = ledger_for(run, site, state_dir)
        ledger.check(plan.noise_multiplier, plan.sample_rate, cfg.local_steps)
        engine = PrivacyEngine(accountant=cfg.accountant)
        engine.accountant = ledger.accountant  # account into the persisted ledger
        private, optimizers[gen.private], loader = engine.make_private(
            module=private,
            optimizer=optimizers[gen.private],
            data_loader=loader,
            noise_multiplier=plan.noise_multiplier,
            max_grad_norm=cfg.max_grad_norm,
            poisson_sampling=True,
            # Noise multiplicity needs per-sample gradients of the whole wrapper (functorch).
            grad_sample_mode="functorch" if cfg.noise_multiplicity > 1 else cfg.grad_sample_mode,
        )
        metrics.update(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate)
    else:
        warnings.warn(f"site {site.name}: training WITHOUT differential privacy (training.dp = false)", UserWarning)
        ledger = None

    losses: list[float] = []
    steps = 0
    private_opt = optimizers[gen.private]
    with ExitStack() as stack:
        virtual = cfg.dp and cfg.max_physical_batch_size and cfg.max_physical_batch_size < cfg.batch_size
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
            if len(x) == 0:  # Poisson sampling can draw an empty batch: nothing is released
                steps += 0 if virtual else 1
                continue
            masks = m[0].to(device) if m else None
            losses.append(gen.train_step(private, optimizers, x.to(device), y.to(device), masks)["train_loss"])
            steps += 0 if getattr(private_opt, "_is_last_step_skipped", False) else 1

    finite = [v for v in losses if v == v]
    metrics.update(
        train_loss=sum(finite) / max(1, len(finite)),
        steps=float(cfg.local_steps),
        num_examples=float(len(data.train_x)),
    )
    if ledger is not None:
        ledger.record_round(server_round, cfg.local_steps)
        metrics.update(epsilon=ledger.spent, epsilon_budget=ledger.epsilon_budget, delta=ledger.delta)
    weights = {k: v.detach().cpu().clone() for k, v in gen.state_dict().items()}
    for key, value in weights.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise FloatingPointError(f"site {site.name}: local update {key} is not finite; not sending it")
    return RoundResult(weights, metrics)


def heldout_loss(run: RunConfig, data: SiteData, weights: dict[str, torch.Tensor], device: torch.device, max_images: int = 256) -> float:
    """The global model's own loss on this site's held-out images (fixed seeds)."""
    gen = build_generator(run.model)
    gen.load_state_dict(weights)
    return float(-gen.membership_scores(data.holdout_x[:max_images], data.holdout_y[:max_images], run.seed, device).mean())
