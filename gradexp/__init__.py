"""gradexp: see, measure and explain gradient flow in deep networks.

`gradexp.watch(model, optimizer, logdir=...)` attaches the probes to any PyTorch model; the
`gradexp` command runs and compares experiments on the networks it builds.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # torch is imported on first use, so that `import gradexp` (and the CLI's --help) stays fast
    if name in ("watch", "Watch"):
        from gradexp import session

        return getattr(session, name)
    raise AttributeError(f"module 'gradexp' has no attribute {name!r}")
