"""The embedded farm on one machine: its server processes (``processes``), Valkey (``valkey``), SeaweedFS S3
(``seaweedfs``) and the farm that starts them with one worker per stage (``embedded``)."""
