"""Typed configuration: YAML files validated into dataclasses.

One source of truth: ``sites/<site>.yaml`` describes a hospital, and a simulation
YAML (``simulations/demo.yaml``) describes a run and lists its site files.
Validation errors name the file and the field, e.g.::

    ConfigError: sites/hospital_a.yaml: privacy.epsilon: Input should be greater than 0
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

STRICT = ConfigDict(extra="forbid")


class ConfigError(ValueError):
    """A configuration file is missing, malformed or fails validation."""


# --------------------------------------------------------------------- sites
@dataclass(config=STRICT)
class PreprocessConfig:
    """How hospital scans become model-ready 2D images (see docs/ingestion.md)."""

    # Output spacing in mm (x, y[, z]); None keeps the scan's own spacing.
    spacing: list[float] | None = None
    orientation: str = "LPS"  # every scan is reoriented to this frame first
    ct_window: list[float] = field(default_factory=lambda: [40.0, 400.0])  # HU centre, width
    percentiles: list[float] = field(default_factory=lambda: [1.0, 99.0])  # MRI / X-ray clip
    # A 3D slice is kept when this share of it is foreground (or it holds mask voxels).
    min_foreground: float = Field(0.1, ge=0, le=1)
    # Foreground = above min + foreground_level * (max - min) of the normalised volume.
    foreground_level: float = Field(0.1, ge=0, le=1)
    mask_threshold: float = 0.0  # mask = voxel > threshold (e.g. 127 for a 0-255 probability map)


@dataclass(config=STRICT)
class SourceConfig:
    """Where a site's images come from. Relative paths are relative to the site YAML."""

    kind: Literal["medmnist", "dicom", "nifti", "images"] = "medmnist"
    dataset: str = "pneumoniamnist"
    # medmnist: explicit file; else $FEDSYNTH_DATA_DIR/medmnist/<dataset>.npz; else download.
    path: str | None = None
    splits: list[Literal["train", "val", "test"]] = field(default_factory=lambda: ["train", "val"])
    download: bool = False
    cache_dir: str = "~/.cache/fedsynth"
    # dicom / nifti / images: a folder of scans and a CSV with a ``path`` (or channel) column and ``label``.
    root: str | None = None
    labels_csv: str | None = None
    modality: Literal["xray", "ct", "mri"] = "xray"
    # CSV columns holding one image file each, stacked as channels (multi-contrast MRI).
    channels: list[str] = field(default_factory=lambda: ["path"])
    mask_column: str | None = None
    patient_column: str | None = None  # nifti/images: who the scan belongs to (pseudonymised)
    # Largest scan read, in voxels (x colour components) per file or DICOM series, checked in the
    # header before any pixel is decompressed. 512^3: a 512x512 CT of 512 slices (docs/ingestion.md).
    max_voxels: int = Field(512**3, ge=1)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)


@dataclass(config=STRICT)
class AcquisitionConfig:
    """A deterministic scanner profile applied to intensities in [0, 1]."""

    gamma: float = Field(1.0, gt=0)
    contrast: float = Field(1.0, gt=0)
    blur_sigma: float = Field(0.0, ge=0)
    noise_std: float = Field(0.0, ge=0)
    offset: float = 0.0
    seed: int = 0


@dataclass(config=STRICT)
class PrivacyBudget:
    """A site's (ε, δ) over every run it ever joins. Finite and bounded: ε = inf never binds,
    and ε > 100 or δ > 1e-2 promise nothing a privacy officer could sign."""

    epsilon: float = Field(gt=0, le=100, allow_inf_nan=False)
    delta: float = Field(1e-5, gt=0, le=1e-2, allow_inf_nan=False)
    # A public, declared count of privacy units (patients) that sets the sampling rate
    # q = batch / units. Unset: the true count is used, and ε (a function of q) reveals it.
    units: int | None = Field(None, ge=1)


@dataclass(config=STRICT)
class SiteConfig:
    name: str = Field(pattern=r"^[A-Za-z0-9_\-]+$")
    # train: a hospital that trains under DP; external: evaluates only; public: data declared
    # public, which the coordinator may pretrain on without DP (server.public_prior).
    role: Literal["train", "external", "public"] = "train"
    description: str = ""  # shown in reports and manifests (what the data is, where it comes from)
    source: SourceConfig = field(default_factory=SourceConfig)
    # Relative size of this site's share of the training pool (train sites only).
    share: float = Field(1.0, gt=0)
    holdout_fraction: float = Field(0.3, gt=0, lt=1)
    acquisition: AcquisitionConfig = field(default_factory=AcquisitionConfig)
    privacy: PrivacyBudget | None = None
    # Where the client keeps its persistent state (privacy ledger). Simulations
    # put it under the run directory when unset.
    state_dir: str | None = None
    origin: str = ""  # file this site was read from; filled by the loader


# ------------------------------------------------------------------ the run
@dataclass(config=STRICT)
class PartitionConfig:
    # Dirichlet concentration of the label skew; smaller means more skewed.
    alpha: float = Field(2.0, gt=0)
    # by_class: each class is split over the sites by Dirichlet(alpha * K * share) (sizes follow
    # the shares only on average). by_site: each site's size is its share of the pool (at least
    # min_images), its label mix Dirichlet(alpha * pool prevalence): what many small, skewed
    # hospitals need, where by_class would leave some sites empty.
    scheme: Literal["by_class", "by_site"] = "by_class"
    min_per_class: int = Field(20, ge=0)
    min_images: int = Field(0, ge=0)  # by_site: the smallest site
    # Cross-validation (fedsynth study): with folds >= 2 each site's held-out set is the fold-th of
    # `folds` label-stratified groups of its units (patients where known), instead of holdout_fraction.
    folds: int = Field(0, ge=0, le=20)
    fold: int = Field(0, ge=0)
    # Seed of the split of the pool into hospitals (and the public share); None: the run's seed.
    # A study fixes it: the hospitals are the same in every cell; seeds vary splits and training.
    seed: int | None = None

    def __post_init__(self):
        if self.folds >= 2 and self.fold >= self.folds:
            raise ValueError(f"partition.fold: {self.fold} is not below partition.folds ({self.folds})")


@dataclass(config=STRICT)
class ModelConfig:
    name: Literal["ddpm", "vae", "gan"] = "ddpm"
    image_size: int = Field(32, ge=8)
    in_channels: int = Field(1, ge=1)  # > 1 for stacked multi-contrast MRI
    mask_channels: int = Field(0, ge=0)  # > 0: DDPM conditioned on masks concatenated to its input
    channels: list[int] = field(default_factory=lambda: [16, 32, 32])
    num_res_blocks: int = Field(1, ge=1)
    norm_num_groups: int = Field(8, ge=1)
    num_train_timesteps: int = Field(1000, ge=10)
    num_classes: int = Field(2, ge=1)
    # Classifier-free guidance (Ho & Salimans 2022), DDPM: train with the label dropped
    # to a null class with this probability; sample with eps = (1 + w) eps(x, y) - w eps(x).
    label_dropout: float = Field(0.0, ge=0, lt=1)
    guidance_scale: float = Field(0.0, ge=0)
    # DDPM: a rank-r low-rank adapter beside every 3x3 convolution of the UNet's residual
    # blocks (LoRA, zero-initialised; see common.models.finetune). 0 = none.
    adapter_rank: int = Field(0, ge=0, le=64)
    latent_size: int = Field(64, ge=2)  # VAE and GAN
    kl_weight: float = Field(1.0, ge=0)  # VAE


@dataclass(config=STRICT)
class TrainingConfig:
    rounds: int = Field(3, ge=1, le=10_000)
    local_steps: int = Field(10, ge=1, le=100_000)
    batch_size: int = Field(64, ge=1, le=1_000_000)  # expected batch size under Poisson sampling
    lr: float = Field(2e-3, gt=0, allow_inf_nan=False)
    max_grad_norm: float = Field(1.0, gt=0, allow_inf_nan=False)
    # Only accountants whose ε is an upper bound calibrate and enforce budgets (GDP is an
    # asymptotic approximation that under-reports ε; see common.privacy.accounting).
    accountant: Literal["rdp", "prv"] = "rdp"
    # How per-sample gradients are clipped (benchmarks/generators.py step compares them): Opacus'
    # "hooks" or "functorch", or "bookkeeping" (common.privacy.bookkeeping: one backward, no
    # per-sample gradients for Linear layers). All three clip exactly (tests/test_dp_exactness.py).
    grad_sample_mode: Literal["hooks", "functorch", "bookkeeping"] = "functorch"
    # Large expected batches on small memory: Opacus' BatchMemoryManager splits each
    # Poisson batch into physical batches of at most this size (virtual steps).
    max_physical_batch_size: int | None = Field(None, ge=1)
    # DPDM's noise multiplicity (Dockhorn et al. 2022): K timestep/noise draws per image
    # averaged inside one per-example gradient (DDPM only; costs ~K x compute).
    noise_multiplicity: int = Field(1, ge=1)
    # Which parameters of the private module train (common.models.finetune): "all", or
    # "norms" / "embeddings" / "biases" / "adapters" / a module-name prefix, on top of a public prior.
    trainable: list[str] = Field(default_factory=lambda: ["all"], min_length=1)
    # Off only for the non-private baselines of a simulation; deployed nodes refuse it.
    dp: bool = True
    threads_per_client: int = Field(1, ge=1)
    # bf16 autocast of each step's forward and backward (a GPU's tensor cores). "auto": on CUDA,
    # for non-private training and for bookkeeping clipping, whose per-sample norms, clipped sums
    # and noise stay in fp32 (Opacus' hooks and functorch would clip bf16 gradients: refused).
    mixed_precision: Literal["auto", "off", "bf16"] = "auto"


@dataclass(config=STRICT)
class SecureAggregationConfig:
    """Flower's SecAgg+ (Bell et al. 2020): the server sees only the sum of the masked updates."""

    enabled: bool = False
    # Share of a node's neighbours (as a fraction of the sampled nodes) needed to rebuild the
    # masks of a node that drops out; at least 2 nodes. Higher = more private, less dropout-tolerant.
    reconstruction_threshold: float = Field(0.5, gt=0, le=1)
    # Weights are clipped to +-clipping_range and quantized to
    # quantization_range levels before masking; a node refuses to send weights outside the range.
    clipping_range: float = Field(8.0, gt=0)
    quantization_range: int = Field(2**22, ge=2**8, le=2**24)
    # SecAgg+'s weight scale; every site sends weight max_weight (sites weigh equally: counts are private).
    max_weight: float = Field(10_000.0, gt=0)
    # A round is aborted before unmasking unless this many nodes sent a real (non-zero weight)
    # update: declined and evaluation-only nodes add zeros, and the "sum" of one update is that update.
    min_contributors: int = Field(2, ge=2)


@dataclass(config=STRICT)
class FederationConfig:
    min_train_nodes: int = Field(2, ge=1)
    # Pause after this round (a maintenance window); running again on the same run folder
    # resumes from the last checkpoint. None runs all rounds.
    stop_after_round: int | None = Field(None, ge=1)
    # Server-side EMA of the global weights over rounds (post-processing: no privacy cost);
    # synthesis samples from the EMA when > 0.
    ema_decay: float = Field(0.0, ge=0, lt=1)
    num_cpus_per_client: float = Field(1.0, gt=0)
    num_gpus_per_client: float = Field(0.0, ge=0)
    timeout_s: float = Field(3600.0, gt=0)
    # Per-round client sampling: max(fraction x eligible nodes, min_train_nodes) sites train,
    # drawn over the sorted node ids by a generator seeded by (run seed, round) (Flower's
    # simulation numbers nodes at random, so which sites are drawn differs between reruns; how
    # many does not). The draw is public, so no privacy amplification is claimed for it: each
    # site's ledger counts only the rounds it trained.
    fraction_train: float = Field(1.0, gt=0, le=1)
    fraction_evaluate: float = Field(1.0, ge=0, le=1)  # 0: no evaluation (secure aggregation always evaluates)
    # A site sampled to train first evaluates the model it receives (the previous round's
    # global) in the same call, so a round costs one message per site, not two; evaluate
    # messages then go, each round, to fraction_evaluate of the nodes that have not trained
    # yet (evaluation-only sites among them), and after the last round to a fraction_evaluate
    # sample of all. False: a separate evaluate message per round (Flower's default flow).
    # No effect under secure aggregation.
    evaluate_in_train: bool = True
    min_evaluate_nodes: int | None = Field(None, ge=1)  # None: min_train_nodes
    # Simulation only (a deployed node ignores them): a sampled site drops out of a round
    # before touching its data or ledger, or answers late by straggler_delay_s; seeded per
    # (run seed, round, site).
    dropout_rate: float = Field(0.0, ge=0, lt=1)
    straggler_rate: float = Field(0.0, ge=0, le=1)
    straggler_delay_s: float = Field(0.0, ge=0)
    # An existing Ray cluster for the simulation ("127.0.0.1:6379", "auto", "ray://host:10001");
    # None: a local Ray instance started for the run ($RAY_ADDRESS is honoured too).
    ray_address: str | None = None
    secure_aggregation: SecureAggregationConfig = field(default_factory=SecureAggregationConfig)


@dataclass(config=STRICT)
class GeneratedSites:
    """``sites: [{generate: {...}}]``: ``n`` simulated hospitals from one template site YAML
    (its source, privacy, holdout), named ``<prefix>_000`` ..., with power-law sizes
    (share of site k proportional to (k+1)^-size_power) and scanner profiles drawn per site,
    each field uniform in its [low, high]. Label skew is ``partition.alpha``."""

    n: int = Field(ge=1, le=10_000)
    template: str = Field(min_length=1)
    prefix: str = Field("site", pattern=r"^[A-Za-z0-9_\-]+$")
    size_power: float = Field(1.0, ge=0, le=5)
    seed: int = 0
    acquisition: dict[Literal["gamma", "contrast", "blur_sigma", "noise_std", "offset"], tuple[float, float]] = field(default_factory=dict)
    # Budgets given to the sites in turn (site k takes epsilon[k % len]); None: the template's.
    epsilon: list[float] | None = None


@dataclass(config=STRICT)
class PublicPriorConfig:
    """Non-private pretraining of the generator on public data, shipped as the round-0 global model.

    ``data`` is a site YAML with ``role: public`` (a folder, an npz or a dataset split; a path
    relative to the run YAML, replaced by its contents when loaded). Site data never enters."""

    data: SiteConfig
    steps: int = Field(1000, ge=1, le=1_000_000)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-3, gt=0, allow_inf_nan=False)
    ema_decay: float = Field(0.995, ge=0, lt=1)  # EMA of the weights, the prior shipped
    # Pretrained priors are cached here by a hash of data, model and settings (relative to output_dir).
    cache_dir: str = ".public_prior"
    # The prior's own seed; None: the run's. A study fixes it, so every cell starts from one
    # public checkpoint and the seeds vary what the sites do (partition, splits, DP noise).
    seed: int | None = None

    def seed_for(self, run_seed: int) -> int:
        return run_seed if self.seed is None else self.seed


@dataclass(config=STRICT)
class SynthesisConfig:
    num_images: int = Field(1000, ge=1)
    ddim_steps: int = Field(20, ge=1)
    batch_size: int = Field(250, ge=1)
    # Share per class label, a public input; None means uniform (sites never send label counts).
    class_mix: dict[int, float] | None = None
    # The deployment's one Ed25519 release-signing key (PEM), made by `fedsynth certs` (or created 0600
    # on first use). A relative path is relative to the working directory; $FEDSYNTH_SIGNING_KEY
    # overrides it. It must lie outside the run folders, which are shared and copied.
    signing_key: str = "certs/release_signing.pem"


@dataclass(config=STRICT)
class ClassifierConfig:
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    channels: list[int] = field(default_factory=lambda: [16, 32, 64])


@dataclass(config=STRICT)
class DownstreamConfig:
    """How a site's classifier uses the release (common.metrics.utility): ``mix`` real and synthetic
    images, or ``pretrain_finetune`` on synthetic then real. The first mode is the headline's."""

    modes: list[Literal["mix", "pretrain_finetune"]] = Field(default_factory=lambda: ["mix", "pretrain_finetune"], min_length=1)
    ratio: float = Field(1.0, gt=0, le=20)  # synthetic images per real image


@dataclass(config=STRICT)
class DomainExtractorConfig:
    """The domain feature extractor's training recipe (on ``public_prior.data`` only)."""

    steps: int = Field(800, ge=1, le=1_000_000)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0)
    seed: int = 0  # fixed, not the run's: every run of a study is scored in the same feature space
    cache_dir: str = ".extractor"  # relative to the folder that holds the run folders


@dataclass(config=STRICT)
class FidelityConfig:
    # "domain": a MONAI encoder trained on the public partition only (no site, no evaluation
    # set); "random-convnet": the same encoder with seeded random weights, the offline fallback
    # when no public data is declared; "inception": the standard TorchScript Inception-v3 at
    # ``inception_path`` (downloaded there first when ``inception_download``).
    extractor: Literal["domain", "random-convnet", "inception"] = "domain"
    domain: DomainExtractorConfig = field(default_factory=DomainExtractorConfig)
    inception_path: str | None = None
    inception_download: bool = False
    max_images: int = Field(1000, ge=10)
    kid_subset_size: int = Field(100, ge=2)
    msssim_pairs: int = Field(200, ge=2)
    nearest_k: int = Field(5, ge=1)  # k of precision/recall/density/coverage


@dataclass(config=STRICT)
class AttackConfig:
    # Members / non-members per site for the model's loss attack; None: all of them.
    max_images: int | None = Field(None, ge=10)
    reid_quantile: float = Field(0.01, gt=0, lt=0.5)
    bootstrap: int = Field(1000, ge=100)  # resamples for the attacks' 95% CIs
    permutations: int = Field(500, ge=50)  # re-splits for the DCR test's null
    domias_components: int = Field(8, ge=1, le=64)  # PCA dims of the density-ratio attack's KDE


@dataclass(config=STRICT)
class GateConfig:
    """The memorisation gate (common.evaluation.gate): refuse to sign a release that crosses any of these."""

    enabled: bool = True
    dcr_alpha: float = Field(0.01, gt=0, lt=1)  # permutation test, H1: closer to training than to held-out
    # ...and the share's excess over its null's 95th percentile (0 = chance, 1 = copies) above this
    dcr_excess_max: float = Field(0.1, ge=0, le=1)
    exact_duplicates_max: int = Field(0, ge=0)
    near_duplicate_share_max: float = Field(0.01, ge=0, le=1)
    reid_rate_max: float = Field(0.05, ge=0, le=1)


@dataclass(config=STRICT)
class AuditConfig:
    """The empirical privacy audit (common.evaluation.audit): gradient canaries per training site."""

    enabled: bool = True
    canaries: int = Field(1000, ge=10, le=100_000)


@dataclass(config=STRICT)
class FUPWeights:
    fidelity: float = Field(1.0, ge=0)
    utility: float = Field(1.0, ge=0)
    privacy: float = Field(1.0, ge=0)


@dataclass(config=STRICT)
class EvaluationConfig:
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)
    fidelity: FidelityConfig = field(default_factory=FidelityConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    fup_weights: FUPWeights = field(default_factory=FUPWeights)
    gate: GateConfig = field(default_factory=GateConfig)


@dataclass(config=STRICT)
class StudyArm:
    """One generator of a study: a label and overrides of the run config (as in compare YAMLs)."""

    label: str
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(config=STRICT)
class StudyConfig:
    """``fedsynth study``: the federation repeated over seeds x patient-disjoint folds."""

    seeds: list[int] = Field(default_factory=lambda: [0, 1], min_length=1)
    folds: int = Field(2, ge=2, le=20)
    ratios: list[float] = Field(default_factory=lambda: [0.25, 0.5, 1.0, 2.0, 4.0], min_length=1)
    arms: list[StudyArm] = field(default_factory=list)  # empty: the config's own generator only
    confidence: float = Field(0.95, gt=0.5, lt=1)


@dataclass(config=STRICT)
class ReaderStudyConfig:
    """``fedsynth reader-study create``: a blinded mix of the release and real held-out images."""

    images: int = Field(60, ge=4, le=5000)  # shown to every reader, stratified by class
    synthetic_fraction: float = Field(0.5, gt=0, lt=1)
    # Sites whose held-out images may be shown to readers: only those that agreed. Empty: none,
    # and `create` refuses (a detection study needs real images).
    consenting_sites: list[str] = field(default_factory=list)
    readers: list[str] = field(default_factory=lambda: ["reader_1", "reader_2", "reader_3"])


@dataclass(config=STRICT)
class RunConfig:
    name: str
    sites: list[SiteConfig]
    seed: int = 0
    output_dir: str = "runs"
    profile: str = "quick"
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    public_prior: PublicPriorConfig | None = None
    study: StudyConfig = field(default_factory=StudyConfig)
    reader_study: ReaderStudyConfig = field(default_factory=ReaderStudyConfig)
    origin: str = ""

    @property
    def training_sites(self) -> list[SiteConfig]:
        return [s for s in self.sites if s.role == "train"]

    @property
    def external_sites(self) -> list[SiteConfig]:
        return [s for s in self.sites if s.role == "external"]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def site_path(site: SiteConfig, path: str) -> Path:
    """Resolve a path from a site YAML: ``~`` and ``${VARS}`` expanded, relative to the YAML's folder."""
    p = Path(os.path.expandvars(path)).expanduser()
    return p if p.is_absolute() or not site.origin else Path(site.origin).parent / p


def site_state_dir(site: SiteConfig) -> Path:
    """Where a site keeps its own persistent files (pseudonym key, ingestion cache)."""
    if site.state_dir:
        return site_path(site, site.state_dir)
    return Path(site.source.cache_dir).expanduser() / "sites" / site.name


# ------------------------------------------------------------------ loaders
def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def validate(cls: type, data: dict[str, Any], path: Path):
    try:
        return TypeAdapter(cls).validate_python(data)
    except ValidationError as exc:
        lines = [f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()]
        raise ConfigError(f"{path}: " + "; ".join(lines)) from None


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_site(path: str | os.PathLike) -> SiteConfig:
    path = Path(path).resolve()
    data = read_yaml(path)
    data["origin"] = str(path)
    site = validate(SiteConfig, data, path)
    if site.role == "train" and site.privacy is None:
        raise ConfigError(f"{path}: privacy: a training site needs an (epsilon, delta) budget")
    if site.source.kind != "medmnist" and not (site.source.root and site.source.labels_csv):
        raise ConfigError(f"{path}: source: kind {site.source.kind!r} needs both root and labels_csv")
    return site


def load_run(path: str | os.PathLike, profile: str = "quick", overrides: dict[str, Any] | None = None) -> RunConfig:
    """Load a simulation YAML, apply ``profiles.<profile>``, then ``overrides``, and load its sites.

    Site paths are relative to the simulation file.
    """
    path = Path(path).resolve()
    data = read_yaml(path)
    profiles = data.pop("profiles", {}) or {}
    if profile != "quick":
        if profile not in profiles:
            raise ConfigError(f"{path}: profiles: no profile named {profile!r} (have: {sorted(profiles)})")
        data = deep_merge(data, profiles[profile])
    if overrides:
        data = deep_merge(data, overrides)
    site_paths = data.get("sites")
    if not isinstance(site_paths, list) or not site_paths:
        raise ConfigError(f"{path}: sites: expected a non-empty list of site YAML paths")
    data["sites"] = []
    for i, entry in enumerate(site_paths):
        if isinstance(entry, dict) and set(entry) == {"generate"}:
            from .site_generator import generate_sites  # it builds on this module

            data["sites"] += generate_sites(validate(GeneratedSites, entry["generate"] or {}, Path(f"{path}: sites.{i}.generate")), path)
        elif isinstance(entry, str):
            data["sites"].append(load_site(path.parent / entry))
        else:
            raise ConfigError(f"{path}: sites.{i}: expected a site YAML path or {{generate: {{n, template, ...}}}}")
    if isinstance(prior := data.get("public_prior"), dict) and isinstance(prior.get("data"), str):
        prior["data"] = load_site(path.parent / prior["data"])
    data["origin"] = str(path)
    data["profile"] = profile
    run = validate(RunConfig, data, path)
    if run.training.rounds * run.training.local_steps > 1_000_000:
        raise ConfigError(f"{path}: training: rounds x local_steps = {run.training.rounds * run.training.local_steps} exceeds 1,000,000 steps")
    if run.model.name == "gan" and run.training.dp and run.training.max_physical_batch_size:
        raise ConfigError(f"{path}: training.max_physical_batch_size: not supported for the DP-GAN "
                          "(its fake rows per physical batch would depend on the private batch size)")
    check_public_prior(run, path)
    check_trainable(run, path)
    if run.training.mixed_precision == "bf16" and run.training.dp and run.training.grad_sample_mode != "bookkeeping":
        raise ConfigError(f"{path}: training.mixed_precision: bf16 under DP needs grad_sample_mode: bookkeeping "
                          "(the others would clip per-sample gradients computed in bf16)")
    if run.model.adapter_rank and run.model.name != "ddpm":
        raise ConfigError(f"{path}: model.adapter_rank: adapters are implemented for ddpm, not {run.model.name}")
    if any(s.role == "public" for s in run.sites):
        raise ConfigError(f"{path}: sites: a 'public' site is not a hospital; declare it as public_prior.data")
    names = [s.name for s in run.sites]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: sites: duplicate site names {names}")
    if not run.training_sites:
        raise ConfigError(f"{path}: sites: at least one site needs role 'train'")
    if unknown := sorted(set(run.reader_study.consenting_sites) - set(names)):
        raise ConfigError(f"{path}: reader_study.consenting_sites: {unknown} are not sites of this run (have: {names})")
    if run.federation.min_train_nodes > len(run.training_sites):
        raise ConfigError(
            f"{path}: federation.min_train_nodes={run.federation.min_train_nodes} exceeds "
            f"the {len(run.training_sites)} training sites"
        )
    if run.federation.secure_aggregation.enabled and run.federation.fraction_train < 1:
        raise ConfigError(f"{path}: federation.fraction_train: client sampling is not supported with secure_aggregation "
                          "(every site takes part in each SecAgg+ round)")
    if run.federation.secure_aggregation.enabled and run.federation.min_train_nodes < 2:
        raise ConfigError(
            f"{path}: federation.secure_aggregation needs federation.min_train_nodes >= 2 "
            "(the sum of one update is that update)"
        )
    if run.federation.secure_aggregation.enabled and run.federation.secure_aggregation.min_contributors > len(run.training_sites):
        raise ConfigError(
            f"{path}: federation.secure_aggregation.min_contributors={run.federation.secure_aggregation.min_contributors} "
            f"exceeds the {len(run.training_sites)} training sites (every round would be aborted)"
        )
    return run


@dataclass(config=STRICT)
class SamplingConfig:
    ddim_steps: int = Field(20, ge=1)


@dataclass(config=STRICT)
class MaskDemoConfig:
    """``fedsynth mask-demo``: a mask-conditioned DDPM on one ingested site (simulations/mask.yaml)."""

    name: str
    site: str  # a site YAML, relative to this file
    model: ModelConfig
    training: TrainingConfig
    segmentation: ClassifierConfig
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    seed: int = 0
    output_dir: str = "runs"
    holdout_fraction: float = Field(0.3, gt=0, lt=1)


def load_mask_demo(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> MaskDemoConfig:
    path = Path(path).resolve()
    data = read_yaml(path)
    if overrides:
        data = deep_merge(data, overrides)
    return validate(MaskDemoConfig, data, path)


def run_from_dict(data: dict[str, Any]) -> RunConfig:
    """Rebuild a RunConfig from ``to_dict()`` output (e.g. a run's saved config.json)."""
    path = Path(data.get("origin") or "<dict>")
    run = validate(RunConfig, data, path)
    check_public_prior(run, path)
    return run


def check_trainable(run: RunConfig, path: Path) -> None:
    """Every ``training.trainable`` group must select parameters of the configured generator:
    refused here, with the file, rather than by every site at its first round."""
    if run.training.trainable == ["all"]:
        return
    from .models.finetune import select_trainable  # models import this module
    from .models.generators import build_generator

    gen = build_generator(run.model)
    try:
        select_trainable(gen.modules[gen.private], run.training.trainable)
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc} ({run.model.name})") from None


def check_public_prior(run: RunConfig, path: Path) -> None:
    """The prior's data must be declared public, however the config was built (file, dict, overrides)."""
    prior = run.public_prior
    if prior is None:
        return
    if prior.data.role != "public":
        raise ConfigError(f"{path}: public_prior.data: must be a site with role 'public' (got {prior.data.name!r}, role {prior.data.role!r})")
    if prior.data.name in {s.name for s in run.sites}:
        raise ConfigError(f"{path}: public_prior.data: name {prior.data.name!r} is also a site of this run")
    if run.model.mask_channels:
        raise ConfigError(f"{path}: public_prior: not implemented for mask-conditioned models (model.mask_channels > 0)")
