"""Operating a farm: batches, cron schedules, job administration, progress, reports and manifests, metrics."""
