"""The ``scalecert`` command line (click)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from scalecert import __version__
from scalecert.attack_registry import available_attacks, describe_attacks
from scalecert.config import WINDOW_LAYOUTS
from scalecert.errors import EnvironmentFault, Refusal
from scalecert.methods.registry import available_methods


class _DefaultInHelp(click.Option):
    """A flag whose help names a default defined elsewhere, written once there: ``{run.top_k}``
    in its help is filled from :func:`_defaults` when the help is shown (the jobs' options
    are imported only then, so `scalecert` itself starts quickly and without torch)."""

    @property  # type: ignore[override]
    def help(self) -> str | None:
        return None if self._help is None else self._help.format_map(_defaults())

    @help.setter
    def help(self, text: str | None) -> None:
        self._help = text


def _option(*decls: str, **attrs: Any) -> Any:
    """``click.option`` for a flag whose help names its default (:class:`_DefaultInHelp`)."""
    return click.option(*decls, cls=_DefaultInHelp, **attrs)


def _defaults() -> dict[str, Any]:
    """Where the defaults the help names are kept: each job's options class, whose field
    defaults are the command's (its certification settings the library's CertConfig's, its
    training and attack settings FinetuneConfig's and AttackConfig's)."""
    from pipeline.analyze.config import AnalyzeRun, paper_attack
    from pipeline.attack.config import AttackOptions
    from pipeline.run.config import RunConfig
    from pipeline.train.config import FinetuneRun
    from scalecert.certify import default_batch_size

    return {"run": RunConfig, "attack": AttackOptions, "finetune": FinetuneRun,
            "analyze": AnalyzeRun, "paper": paper_attack(),
            "alphas": ", ".join(f"{alpha:g}" for alpha in AnalyzeRun.alphas),
            "augment": "on" if FinetuneRun.augment else "off",
            "g_batch": {device: default_batch_size(device) for device in ("cpu", "cuda")}}


# Exit codes besides click's (1: refused or failed, 2: bad usage).
EXIT_AUDIT_FAILED = 3
EXIT_INCOMPLETE = 4
EXIT_ENVIRONMENT = 5  # storage, endpoint or credentials failed; a rerun resumes


class EnvironmentFailed(click.ClickException):
    """An environment failure as the command line reports it: one line, exit 5."""

    exit_code = EXIT_ENVIRONMENT


def _refused(exc: Refusal, prefix: str = "") -> click.ClickException:
    """The one-line error for a refusal; an environment failure exits with its own code."""
    kind = EnvironmentFailed if isinstance(exc, EnvironmentFault) else click.ClickException
    return kind(f"{prefix}{exc}")


class _Commands(click.Group):
    """The command group; an environment failure that no command turned into its message
    (say, a disk filling up under a library call) still ends as one line and exit 5, naming
    the file when the error does."""

    def invoke(self, ctx: click.Context) -> Any:
        from pipeline.io.faults import environment_cause

        try:
            return super().invoke(ctx)
        except EnvironmentFault as exc:
            raise _refused(exc) from None
        except OSError as exc:
            cause = environment_cause(exc)
            if cause is None:
                raise
            where = exc.filename if exc.filename is not None else "a local file"
            raise EnvironmentFailed(f"{where}: {cause}") from None


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="scalecert")
def main() -> None:
    """Certify image classifiers against adversarial patches (ScaleCert), at scale.

    Exit codes: 0 ok; 1 refused or failed; 2 bad usage; 3 audit failed; 4 shards missing
    (report); 5 the environment failed (storage, endpoint, credentials): nothing half-written
    is kept, and rerunning the same command resumes."""


@main.command("models")
def models_command() -> None:
    """List what --model and load_model() accept: the built-in names, then the other forms of
    a model spec, one line each."""
    from scalecert.models import available_models
    from scalecert.models.spec import FORMS

    for name in available_models():
        click.echo(name)
    click.echo("")
    click.echo("and any PyTorch classifier, as --model SPEC (user models declare --input-size):")
    width = max(len(form) for form, _ in FORMS)
    for form, what in FORMS:
        click.echo(f"  {form:<{width}}  {what}")


# The model and its preprocessing, shared by every job (certify, attack, analyze, finetune).
_MODEL_OPTIONS = (
    click.option("--model", help="Model spec: a built-in name (`scalecert models` lists them), "
                 "file:PATH.py:CALLABLE, module:IMPORT.PATH:CALLABLE, export:PATH.pt2 (local or "
                 "s3://), torchvision:NAME or timm:NAME."),
    click.option("--input-size", type=int,
                 help="Square side the model takes, in px (required for file:, module: and "
                      "export: models; built-ins, timm: and torchvision: know theirs)."),
    click.option("--resize", type=int,
                 help="Resize the short side to this many px, then centre-crop --input-size "
                      "(default: no resize; images must already be input-size square)."),
    click.option("--interpolation", type=click.Choice(["bilinear", "bicubic"]),
                 help="Filter of --resize (Pillow's; default bilinear)."),
    click.option("--mean", help="Per-channel mean R,G,B the model expects, subtracted inside "
                 "the wrapped model so windows act on [0, 1] pixels (not for built-ins)."),
    click.option("--std", help="Per-channel std R,G,B, with --mean (not for built-ins)."),
)


@main.command("methods")
def methods_command() -> None:
    """List the methods that --method and CertConfig(method=...) accept: name, the guarantee
    of its certificates, what it does."""
    from scalecert.methods import describe_methods

    for line in describe_methods():
        click.echo(line)


# The options of a certification run, shared by `certify` and `attack` (an attack run
# certifies every clean image with the same options).
_RUN_OPTIONS = (
    click.option("--data", help="Labelled images: root/<class>/<image>, or an ImageNet val folder "
                 "with --ground-truth; a local path or s3://bucket/prefix."),
    *_MODEL_OPTIONS,
    click.option("--checkpoint", help="State-dict file (local or s3://) with the model's own "
                 "key names; default: the weights the spec builds (random for built-ins)."),
    click.option("--patch", "patches", multiple=True,
                 help="Patch side in pixels (32) or share of the image area (2%). Repeatable."),
    _option("--method", "methods", multiple=True, type=click.Choice(available_methods()),
            help="Defense(s) to certify (`scalecert methods` lists them); repeatable. "
                 "Default: {run.methods[0]}."),
    _option("--top-k", type=float,
            help="Share of superficial positions SIN pruning keeps ({run.top_k:g})."),
    _option("--masks-per-axis", type=int, help="Masks per image axis ({run.masks_per_axis}: "
            "{run.masks_per_axis} x {run.masks_per_axis} masks)."),
    _option("--r", type=int,
            help="Coverage r: each patch lies in an r x r block of masks ({run.r})."),
    click.option("--layer", help="Superficial layer to split at: a built-in's stage, or a node "
                 "or module path of a user model's graph (default: the first spatial, "
                 "non-negative activation, after the first ReLU)."),
    _option("--margin", type=float,
            help="Logit margin every certifying prediction needs ({run.margin:g})."),
    _option("--vote", type=click.Choice(["unanimous", "majority"]),
            help="Detection rule for r >= 2: unanimous (Algorithm 1's block and majority rules) "
                 "or majority (every r x r block's strict majority must be M(x); certificates "
                 "need a strict majority for the label in every block). Default: {run.vote}."),
    _option("--window-layout", type=click.Choice(WINDOW_LAYOUTS),
            help="Mask windows per axis: clipped (the last window clipped to the image) or "
                 "patchcleanser (r = 1: the reference PatchCleanser's, the last window shifted "
                 "inward at full size; use it to compare with published PatchCleanser and "
                 "Minority Reports figures). Default: {run.window_layout}."),
    click.option("--alert-confidence", type=float,
                 help="TAU in (0, 1): detection alerts only on a window that disagrees with "
                      "softmax confidence >= TAU, and certificates need every window at >= TAU "
                      "(detection methods, r = 1). Default: off (any disagreement alerts)."),
    click.option("--full-map/--no-full-map", default=None,
                 help="Run every mask and store each image's per-mask predictions (audits). "
                      "Default: stop an image's masks once its outcome is settled (r = 1)."),
    click.option("--ground-truth", help="ImageNet val: LOC_val_solution.csv or a 1-based label file."),
    click.option("--synsets", help="ImageNet: file of the 1000 synsets (sorted order = class index)."),
    click.option("--out", help="Output folder (local or s3://): manifest.json and the rows "
                 "(certificates/; attack runs: attacks/)."),
    click.option("--config", "config_path", type=click.Path(dir_okay=False),
                 help="YAML file with the same options (flags override it)."),
    click.option("--address", help="Ray cluster address (auto, ray://host:10001); default: local."),
    click.option("--workers", type=int, help="Worker actors (default: one per GPU, else 1)."),
    click.option("--gpus-per-worker", type=float, help="GPUs per worker (default 1 when GPUs exist)."),
    _option("--device", type=click.Choice(["auto", "cpu", "cuda"]),
            help="Worker device ({run.device})."),
    _option("--shard-size", type=int, help="Images per shard and Parquet file ({run.shard_size})."),
    _option("--batch-size", type=int, help="(image, mask) pairs per forward pass of g "
            "({g_batch[cpu]} on a CPU, {g_batch[cuda]} on CUDA)."),
    click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]),
                 help="How g runs: bf16 autocast re-checks close calls in fp32, so outcomes equal "
                      "fp32's (auto: bf16 on cuda, fp32 on cpu)."),
    click.option("--compile/--no-compile", default=None,
                 help="torch.compile g, falling back to eager if it fails (default: on for cuda)."),
    click.option("--fuse-bn/--no-fuse-bn", default=None,
                 help="Fold g's BatchNorms into its convolutions, close calls re-checked in eager "
                      "fp32 (default: on)."),
    click.option("--limit", type=int, help="Certify only the first N images (sorted keys)."),
    click.option("--resume/--no-resume", default=None,
                 help="Skip shards already written with the same fingerprint (default: resume)."),
    click.option("--s3-endpoint", help="S3-compatible endpoint URL (default: $AWS_ENDPOINT_URL)."),
    click.option("--quiet", is_flag=True, help="No progress bar."),
)


def _run_options(command: Any) -> Any:
    """``command`` with every option of :data:`_RUN_OPTIONS`, in their order."""
    return _with(_RUN_OPTIONS)(command)


# The per-image attack's budget, shared by `attack` and `analyze`.
_ATTACK_BUDGET = (
    _option("--steps", type=int, help="Optimisation steps per restart ({attack.steps})."),
    _option("--restarts", type=int,
            help="Restarts per image; the strongest wins ({attack.restarts})."),
    _option("--step-size", type=float,
            help="Signed-gradient step on pixel values ({attack.step_size:g})."),
    _option("--location", type=click.Choice(["worst", "random"]),
            help="Where the patch goes: worst, the worst position of a coarse search, or "
                 "random, a random one per restart (default {attack.location})."),
    _option("--seed", type=int, help="Seed of positions and restarts ({attack.seed})."),
)


def _with(options: tuple[Any, ...]) -> Any:
    """A decorator adding ``options`` to a command, in their order."""
    def decorate(command: Any) -> Any:
        for option in reversed(options):
            command = option(command)
        return command
    return decorate


@main.command("certify")
@_run_options
def certify_command(config_path: str | None, quiet: bool, **options: Any) -> None:
    """Certify every image of a labelled dataset; one Parquet certificate file per shard."""
    from pipeline.run.config import RunConfig

    try:
        run = RunConfig.from_sources(config_path, options)
    except Refusal as exc:
        raise click.UsageError(str(exc)) from None
    _run_and_report(run, quiet)


def _run_and_report(run: Any, quiet: bool) -> None:
    from pipeline.progress import ProgressLine
    from pipeline.certify.driver import run_certification

    progress = ProgressLine(enabled=not quiet)
    try:
        summary = run_certification(run, progress=progress.shard_done, on_plan=progress.start)
    except Refusal as exc:
        raise _refused(exc) from None
    finally:
        progress.close()
    _echo_summary(run.out, summary)
    for (patch_px, method), accuracy in summary.certified_accuracy().items():
        click.echo(f"  certified accuracy {method:<10} {patch_px:>3} px: {100 * accuracy:5.1f}%")


@main.command("attack")
@_run_options
@_option("--attack", type=click.Choice(available_attacks()),
         help=describe_attacks() + " Default: {attack.attack}.")
@_option("--attack-model", type=click.Choice(["undefended", "defended"]),
         help="The model the attack optimises against: the plain model, or the "
              "method's M (default: {attack.attack_model}).")
@_with(_ATTACK_BUDGET)
@click.option("--eot", type=int, help="Positions averaged per step (expectation over "
              "locations; 1: the patch stays put).")
@_option("--alpha", type=float,
         help="Adaptive: weight of the activation penalty ({attack.alpha}).")
@click.option("--target", type=int, help="Targeted attack: the class aimed at (default: "
              "untargeted).")
@click.option("--universal-data", help="Universal: labelled training images to train the "
              "patch on (local or s3://).")
@_option("--universal-images", type=int, help="Universal: training images used, spread "
         "over the listing ({attack.universal_images}).")
@_option("--universal-epochs", type=int,
         help="Universal: passes over them ({attack.universal_epochs}).")
def attack_command(config_path: str | None, quiet: bool, **options: Any) -> None:
    """Attack every image of a labelled dataset with adversarial patches and run the defense
    on the attacked images; one Parquet file of attack rows per shard, and the audit.

    Each clean image is certified in the same run with the same options. A certified image
    whose attacked version ends in neither its label nor ALERT breaks the certificate: such
    violations are printed and make the command exit with code 3.
    """
    from pipeline.io import storage
    from pipeline.progress import ProgressLine
    from pipeline.attack.config import AttackRun
    from pipeline.attack.driver import run_attack

    try:
        attack_run = AttackRun.from_sources(config_path, options)
    except Refusal as exc:
        raise click.UsageError(str(exc)) from None
    run = attack_run.run
    progress = ProgressLine(enabled=not quiet)
    try:
        summary = run_attack(attack_run, progress=progress.shard_done, on_plan=progress.start,
                             log=click.echo)
    except Refusal as exc:
        raise _refused(exc) from None
    finally:
        progress.close()
    _echo_summary(run.out, summary)
    _attack_report(run.out, None, storage.S3Options(endpoint=run.s3_endpoint))


def _echo_summary(out: str, summary: Any) -> None:
    """The run line of a certify or attack run's :class:`~pipeline.run.driver.RunSummary`."""
    click.echo(f"run {out}: {summary.images} images in {summary.shards} shards "
               f"({summary.shards_skipped} already done), {summary.errors} errors, "
               f"{summary.wall_s:.1f} s"
               + (f", {summary.images_per_s:.1f} images/s" if summary.images_run else ""))


def _attack_report(run: str, out_dir: str | None, s3: Any) -> None:
    """Reduce an attack run into attack_report.json/.md/.html, print its figures and audit
    it: exit 3 when a certified image was fooled."""
    from pipeline.report.attacks import (
        attack_figures,
        read_attack_run,
        violation_lines,
        write_attack_report,
    )
    from pipeline.report.text import pct

    try:
        stored = read_attack_run(run, s3)
        figures = attack_figures(stored.table)
        written = write_attack_report(out_dir or run, stored, figures, s3)
    except Refusal as exc:
        raise _refused(exc) from None
    for g in figures:
        click.echo(f"  {g.attack} on {g.attack_model}, {g.method:<10} {g.patch_px:>3} px: fools "
                   f"the undefended model {pct(g.undefended_success.to_dict())}, M "
                   f"{pct(g.pruned_success.to_dict())}; alerts {pct(g.alert_rate.to_dict())}, "
                   f"wrong label {pct(g.defended_fooled.to_dict())}, recovered "
                   f"{pct(g.empirical_recovery.to_dict())}; {len(g.violations)} violations of "
                   f"{g.certified} certified")
    if stored.missing:
        click.echo(f"MISSING shards {[m.index for m in stored.missing]}: their images are in "
                   "no figure", err=True)
    click.echo("wrote " + ", ".join(written))
    lines = violation_lines(figures)
    if lines:
        for line in lines:
            click.echo(line, err=True)
        click.echo(f"audit FAILED: {len(lines)} certified images were fooled", err=True)
        sys.exit(EXIT_AUDIT_FAILED)
    click.echo("audit passed: no certified image was fooled")


@main.command("analyze")
@click.option("--data", help="Labelled images root/<class>/<image>, local or s3://.")
@_with(_MODEL_OPTIONS)
@click.option("--checkpoint", help="State-dict file (local or s3://) with the model's own key "
              "names; default: the weights the spec builds (random for built-ins).")
@click.option("--patch", help="One patch size: pixels (5) or share of the image area (2.4%).")
@_option("--method", type=click.Choice(available_methods()),
         help="The defense whose M and detector are measured (default {run.methods[0]}).")
@_option("--top-k", type=float,
         help="Share of superficial positions SIN pruning keeps ({run.top_k:g}).")
@_option("--masks-per-axis", type=int,
         help="Masks per image axis of the detector ({run.masks_per_axis}).")
@click.option("--layer", help="Superficial layer: a built-in's stage, or a node or module path "
              "of a user model's graph (default: the first spatial, non-negative activation).")
@_option("--images", type=int,
         help="Images, spread evenly over the listing ({analyze.images}).")
@_option("--count", type=int,
         help="Strongest superficial neurons per image ({analyze.count}).")
@_option("--alpha", "alphas", type=float, multiple=True,
         help="Adaptive attack penalty weight of the sweep (Eq. 6); repeatable, replaces "
              "the default {alphas}.")
@_option("--attack-model", type=click.Choice(["undefended", "defended"]),
         help="The model the per-image attack optimises against (default: "
              "{paper.attack_model}, as "
                   "in the paper's analysis).")
@_with(_ATTACK_BUDGET)
@click.option("--out", help="Output folder (local or s3://), required (here or in --config): "
              "analysis.json, analysis.md, analysis.html.")
@click.option("--s3-endpoint", help="S3-compatible endpoint URL (default: $AWS_ENDPOINT_URL).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="YAML file with the same options (flags override it).")
def analyze_command(config_path: str | None, **options: Any) -> None:
    """The paper's Fig. 1 SIN statistics on a labelled dataset, in this process: how localized
    the strongest superficial neurons are on benign and per-image-patched images (distance
    spread, MeanShift clusters), M's accuracy with the densest SIN cluster occluded, and the
    adaptive attack's success and detection against alpha. Writes analysis.json/.md/.html.
    """
    from pipeline.io import storage
    from pipeline.report.analysis import summary_lines, write_analysis
    from pipeline.analyze.config import AnalyzeRun
    from pipeline.analyze.driver import run_analysis

    try:
        run = AnalyzeRun.from_sources(config_path, options)
    except Refusal as exc:
        raise click.UsageError(str(exc)) from None
    try:
        stats = run_analysis(run, log=click.echo)
        written = write_analysis(run.run.out, stats,
                                 storage.S3Options(endpoint=run.run.s3_endpoint))
    except Refusal as exc:
        raise _refused(exc) from None
    for line in summary_lines(stats):
        click.echo(line)
    click.echo("wrote " + ", ".join(written))


@main.command("finetune")
@click.option("--data", help="Labelled training images root/<class>/<image>, local or s3://.")
@_with(_MODEL_OPTIONS)
@click.option("--checkpoint", help="Weights to start from (local or s3://); default: the "
              "weights the spec builds (random for built-ins).")
@click.option("--out", help="Output folder (local or s3://): finetune.json, ray-train/ "
              "(a checkpoint per epoch) and <model>-<method>.pt with its .json sidecar "
              "(<model>: the spec's short name; the weights load back with the same --model).")
@click.option("--patch", help="Patch size trained for: pixels (5) or share of the area (2.4%).")
@_option("--method", type=click.Choice(available_methods()),
         help="scalecert (and patchcleanser_sin): SIN pruning in the forward pass; "
              "masking (and patchcleanser): the unpruned control trained on "
              "pixel-occluded images (default {finetune.method}).")
@_option("--top-k", type=float, help="Share of superficial positions kept ({finetune.top_k:g}).")
@_option("--masks-per-axis", type=int,
         help="Mask family windows per axis ({finetune.masks_per_axis}).")
@_option("--r", type=int, help="Coverage r of the mask family ({finetune.r}).")
@click.option("--layer", help="Superficial layer: a built-in's stage, or a node or module path "
              "of a user model's graph (default: the first spatial, non-negative activation).")
@_option("--epochs", type=int, help="Epochs ({finetune.epochs}).")
@_option("--batch-size", type=int,
         help="Global batch, split over the workers ({finetune.batch_size}).")
@_option("--lr", type=float, help="Initial learning rate, cosine schedule ({finetune.lr:g}).")
@_option("--momentum", type=float, help="SGD momentum ({finetune.momentum:g}).")
@_option("--weight-decay", type=float, help="SGD weight decay ({finetune.weight_decay:g}).")
@_option("--mask-probability", type=float, help="Share of training images under a random "
         "window of the family ({finetune.mask_probability:g}).")
@_option("--objective", type=click.Choice(["random-window", "worst-window"]),
         help="random-window: the loss under a sampled window or none; worst-window: the loss "
              "without a window plus the loss under the window the model gets most wrong (one "
              "extra no-grad forward per window a step). Default: {finetune.objective}.")
@_option("--augment/--no-augment", default=None,
         help="Random 4-pixel-padded crops and flips (default {augment}).")
@_option("--seed", type=int,
         help="Seed for shuffling, augmentation and windows ({finetune.seed}).")
@click.option("--limit", type=int, help="Train on the first N images only (sorted keys).")
@click.option("--eval-data", help="Held-out labelled images: accuracy and certified accuracy "
              "at --patch after every epoch.")
@click.option("--eval-limit", type=int, help="Evaluate on the first N held-out images only.")
@click.option("--workers", type=int, help="Ray Train workers (default: one per GPU, else 1).")
@_option("--device", type=click.Choice(["auto", "cpu", "cuda"]),
         help="Worker device ({finetune.device}).")
@click.option("--address", help="Ray cluster address (auto, ray://host:10001); default: local.")
@click.option("--s3-endpoint", help="S3-compatible endpoint URL (default: $AWS_ENDPOINT_URL).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="YAML file with the same options (flags override it).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def finetune_command(config_path: str | None, quiet: bool, **options: Any) -> None:
    """Fine-tune a model for certification on Ray Train (DDP), resuming from the last epoch.

    Rerunning the same command continues an interrupted run from its newest checkpoint; an
    output folder of a different run is refused.
    """
    from pipeline.progress import TrainingProgress
    from pipeline.train.config import FinetuneRun
    from pipeline.train.trainer import run_finetune

    try:
        run = FinetuneRun.from_sources(config_path, options)
    except Refusal as exc:
        raise click.UsageError(str(exc)) from None
    progress = TrainingProgress(run.epochs, enabled=not quiet)
    try:
        summary = run_finetune(run, on_event=progress.event)
    except Refusal as exc:
        raise _refused(exc) from None
    finally:
        progress.close()
    if summary.already_done:
        click.echo(f"already done: {summary.checkpoint} (rerun with another --out to train again)")
    if summary.already_done or quiet:
        for metrics in summary.epochs:
            click.echo(TrainingProgress.describe(metrics))
    click.echo(f"wrote {summary.checkpoint} (sha256 {summary.sha256}) trained on "
               f"{summary.images} images ({summary.skipped} skipped), {summary.wall_s:.1f} s")


@main.command("demo")
@click.option("--out", default="runs/demo", show_default=True, help="Output folder.")
@click.option("--workdir", default="runs/demo-work", show_default=True,
              help="Where the synthetic data and the trained model are kept (reused).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def demo_command(out: str, workdir: str, quiet: bool) -> None:
    """The embedded default: synthetic data, a SIN-trained model, local Ray, Parquet in runs/,
    and the run's report (report.html, .md and .json) beside them."""
    from pipeline.compute.cluster import set_torch_threads
    from pipeline.io import storage
    from pipeline.demo.model import demo_cert_config, train_demo_model
    from pipeline.demo.synthetic import write_synthetic_dataset
    from pipeline.run.config import RunConfig

    set_torch_threads(os.cpu_count() or 1)
    work = Path(workdir)
    click.echo(f"1/4 synthetic data set (procedural, 10 classes, 32x32) in {work / 'data'}")
    data = write_synthetic_dataset(work / "data")
    click.echo("2/4 SIN fine-tuning of cifar_resnet20 on it, from scratch (reused when present)")
    checkpoint = train_demo_model(
        data, work / "model" / "cifar_resnet20-synthetic.pt",
        on_epoch=lambda m: click.echo(f"    epoch {m.epoch}: loss {m.loss:.3f}, "
                                      f"train accuracy {100 * m.accuracy:.1f}%"))
    cert = demo_cert_config()
    click.echo(f"3/4 certifying the test split through the pipeline (local Ray) into {out}")
    run = RunConfig(
        data=str(Path(data) / "test"), model="cifar_resnet20", checkpoint=str(checkpoint),
        out=out, patches=(str(cert.patch_px),), methods=("scalecert",),
        top_k=cert.top_k, masks_per_axis=cert.masks_per_axis, shard_size=100,
    )
    _run_and_report(run, quiet)
    click.echo(f"4/4 the run's report, as `scalecert report {out}` writes it")
    click.get_current_context().invoke(report_command, run=out)
    click.echo(f"open {storage.join(out, 'report.html')} to see what the run found")


@main.command("report")
@click.argument("run")
@click.option("--against", help="Earlier run of the same images: audit diff against it.")
@click.option("--max-drop", type=float, default=1.0, show_default=True,
              help="Audit: exit 3 when certified accuracy drops by more than this many "
              "percentage points for any (method, patch).")
@click.option("--archive", help="Copy the run folder and reports to "
              "s3://bucket/prefix/<model>/<dataset>/<run_id>/ and verify every object.")
@click.option("--out-dir", help="Where to write report.json/.md/.html (default: RUN).")
@click.option("--allow-missing", is_flag=True,
              help="Exit 0 even when shards are missing (they are reported either way).")
@click.option("--worst", type=int, default=10, show_default=True,
              help="Classes listed per (method, patch) in the worst-classes table.")
@click.option("--thumbnails", type=int, default=24, show_default=True,
              help="Clean-alert images embedded in report.html.")
@click.option("--s3-endpoint", help="S3-compatible endpoint URL (default: $AWS_ENDPOINT_URL).")
def report_command(run: str, against: str | None, max_drop: float, archive: str | None,
                   out_dir: str | None, allow_missing: bool, worst: int, thumbnails: int,
                   s3_endpoint: str | None) -> None:
    """Reduce a run's certificates into report.json, report.md and report.html.

    Exit codes: 0 ok; 1 refused (mixed fingerprints, rows contradicting the manifest, runs of
    different data); 3 audit failed (--against, certified accuracy dropped > --max-drop pp);
    4 shards missing (report still written; --allow-missing to accept). An attack run's
    folder (`scalecert attack`) gets attack_report.json/.md/.html and the audit instead: exit 3
    when a certified image was fooled.
    """
    from pipeline.io import storage
    from pipeline.io.preflight import check_locations, check_writable
    from pipeline.report.archive import archive_run
    from pipeline.report.figures import build_report
    from pipeline.report.published import load_published
    from pipeline.report.reduce import load_run
    from pipeline.report.text import pct, signed_pp
    from pipeline.report.write import write_report

    if max_drop < 0:
        raise click.BadParameter("must be >= 0", param_hint="--max-drop")
    s3 = storage.S3Options(endpoint=s3_endpoint)
    if _is_attack_run(run, s3):
        if against or archive:
            raise click.UsageError("--against and --archive take certify runs; "
                                   f"{run} is an attack run")
        _attack_report(run, out_dir, s3)
        return
    try:
        check_locations(out_dir or run, (("RUN", run), ("--against", against)), s3)
        if archive and storage.is_s3(archive):  # archive_run refuses other schemes itself
            check_writable(archive, s3)
        data = load_run(run, s3)
        previous = load_run(against, s3) if against else None
        report = build_report(data, load_published(), previous, max_drop, worst)
        written = write_report(report, out_dir or run, s3, thumbnails)
    except Refusal as exc:
        raise _refused(exc) from None
    comp = report["completeness"]
    click.echo(f"run {report['run']['run_id']}: {comp['images_listed']} images, "
               f"{comp['shards_present']}/{comp['shards_listed']} shards, "
               f"{report['errors']['images']} errors, {report['clean_alerts']['total']} clean alerts")
    for g in report["groups"]:
        recovery = g["guarantee"] == "recovery"  # its clean output is the recovered label
        click.echo(f"  {g['method']:<17} {g['patch_px']:>3} px  certified "
                   f"{'recovery ' if recovery else ''}{pct(g['certified_accuracy'])}  "
                   f"{'recovered ' if recovery else ''}clean {pct(g['clean_accuracy'])}")
    if not comp["complete"]:
        click.echo(f"MISSING shards {[m['index'] for m in comp['missing_shards']]}: "
                   f"{comp['images_missing']} images counted as not certified", err=True)
    diff = report["diff"]
    if diff is not None:
        click.echo(f"audit against {diff['against']} (run {diff['against_run_id']}), "
                   f"max drop {diff['max_drop_pp']:g} pp:")
        for g in diff["groups"]:
            click.echo(f"  {g['method']:<17} {g['patch_px']:>3} px  certified "
                       f"{signed_pp(g['certified_accuracy'])}  lost {len(g['lost_certification'])}"
                       f" gained {len(g['gained_certification'])}  "
                       f"{'FAILED' if g['failed'] else 'ok'}")
            for image_id in g["lost_certification"][:20]:
                click.echo(f"    lost: {image_id}")
    click.echo("wrote " + ", ".join(written.locations))
    if archive:
        if not comp["complete"] and not allow_missing:
            raise click.ClickException("not archiving an incomplete run (--allow-missing to "
                                       "archive it anyway)")
        try:
            result = archive_run(run, archive, s3)
            if out_dir is not None:
                click.echo(f"note: reports in {out_dir} are not inside the run folder and were "
                           "not archived")
        except Refusal as exc:
            raise _refused(exc, "archive: ") from None
        click.echo(f"archived {result.verified} objects to {result.uri} ({len(result.uploaded)} "
                   f"uploaded, {len(result.unchanged)} unchanged, all verified)")
    if diff is not None and diff["failed"]:
        click.echo("audit FAILED: certified accuracy dropped by more than "
                   f"{diff['max_drop_pp']:g} pp", err=True)
        sys.exit(EXIT_AUDIT_FAILED)
    if not comp["complete"] and not allow_missing:
        sys.exit(EXIT_INCOMPLETE)


def _is_attack_run(run: str, s3: Any) -> bool:
    """Whether the folder ``run`` holds a `scalecert attack` run (its manifest says so)."""
    import json

    from pipeline.io import storage

    try:
        manifest = json.loads(storage.read_bytes(storage.join(run, "manifest.json"), s3))
    except (OSError, ValueError):
        return False  # the certify report names what is wrong with the folder
    return isinstance(manifest, dict) and manifest.get("job") == "attack"


if __name__ == "__main__":
    sys.exit(main())
