"""The ``scalecert`` command line (click)."""

from __future__ import annotations

import click

from scalecert import __version__, available_models


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="scalecert")
def main() -> None:
    """Certify image classifiers against adversarial patches (ScaleCert), at scale."""


@main.command("models")
def models_command() -> None:
    """List the model names that --model and load_model() accept."""
    for name in available_models():
        click.echo(name)


@main.command("demo")
def demo_command() -> None:
    """Run the embedded default end to end (synthetic data, local Ray, output under runs/)."""
    click.echo(
        "scalecert demo: not yet available: it arrives with the distributed pipeline. "
        "The certification library works today (see README, 'Python API')."
    )
