"""The ``reelfarm`` command line: one click group, assembled from its command modules.

- ``common``: the shared ``--config`` option, one-line errors, spec options, tables;
- ``job_commands``: submit, status, wait, run, decode-from;
- ``batch_commands``: batch, ls, cancel, retry, report, manifest, cron;
- ``farm_commands``: up, down, worker, model, info, metrics, serve (the HTTP front), api-key;
- ``tenant_commands``: usage (per API key and day), redis-acl;
- ``deploy_commands``: settings-doc, worker-ready;
- ``lora_commands``: lora add, lora ls.

Nothing here imports torch: submitting and watching jobs needs no GPU stack.
"""

from __future__ import annotations

import click

from scheduler.cli import batch_commands, deploy_commands, farm_commands, job_commands, lora_commands, tenant_commands


@click.group()
def main() -> None:
    """reelfarm: a queue-driven farm for batch text-to-video with Wan2.1-class models."""


for _command in (
    job_commands.submit,
    job_commands.status,
    job_commands.wait,
    job_commands.run,
    job_commands.decode_from,
    farm_commands.up,
    farm_commands.down,
    farm_commands.worker,
    farm_commands.model,
    lora_commands.lora,
    farm_commands.info_command,
    farm_commands.metrics_command,
    farm_commands.serve_command,
    farm_commands.api_key_command,
    batch_commands.batch_command,
    batch_commands.ls_command,
    batch_commands.cancel_command,
    batch_commands.retry_command,
    batch_commands.report_command,
    batch_commands.manifest_command,
    batch_commands.cron_command,
    tenant_commands.usage_command,
    tenant_commands.redis_acl_command,
    deploy_commands.settings_doc,
    deploy_commands.worker_ready,
):
    main.add_command(_command)

__all__ = ["main"]
