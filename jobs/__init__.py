"""Thin job entrypoints: ``python -m jobs.<job> --config FILE`` (locally or under ``ray job submit``)."""
