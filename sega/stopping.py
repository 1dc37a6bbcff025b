"""Stopping a pipeline call between denoising steps."""


class Stopped(Exception):
    """Raised by a pipeline call whose ``stop`` was set: the call ended at a step boundary; nothing is returned or cached."""
