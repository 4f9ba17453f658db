"""Gradient flow in a Hugging Face Trainer run: `Trainer(..., callbacks=[GradientFlow()])`.

A thin layer over `gradexp.watch`: it attaches to the Trainer's model and its torch optimizer when
training begins and closes the watcher when training ends.

Where the Trainer calls what (transformers 4.40 to 5.x): per optimizer step, on_step_begin, forward
and backward of each micro-batch, clipping to `max_grad_norm`, on_pre_optimizer_step, the step,
on_optimizer_step, on_step_end. The Trainer's optimizer is accelerate's AcceleratedOptimizer, which
calls the torch optimizer's `step` (so its step hooks fire) and holds the fp16 GradScaler if any.
The engine measures gradients at the end of backward, so it sees them before clipping.

The Trainer has no event for a failed `train()`: if it raises, `callback.watcher.close()` removes
the hooks and writes the summary.
"""

from __future__ import annotations

from pathlib import Path

from gradexp.session import Adapter

try:
    import transformers
except ImportError as e:
    raise ImportError("gradexp.huggingface needs transformers: pip install 'gradexp[huggingface]'") from e


class GradientFlow(Adapter, transformers.TrainerCallback):
    """Measures per-layer gradient flow while `Trainer.train` runs.

    logdir: the log folder (TensorBoard events, summary.json, gradient_flow.png); default
        `gradient_flow` inside `args.logging_dir` (transformers 4.x), else `args.output_dir`.
    every, weight_every, layers, ...: any option of `gradexp.watch` but scaler and last_step, which
        the Trainer tells.

    After training, `callback.watcher.summary()` holds what summary.json holds.
    """

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        # every rank watches (each logged step's sums are read across the ranks in one collective);
        # rank 0 alone writes
        # transformers 5 dropped `logging_dir`
        logdir = self.logdir or Path(getattr(args, "logging_dir", None) or args.output_dir) / "gradient_flow"
        self.attach(model, getattr(optimizer, "optimizer", optimizer), logdir,  # the torch optimizer inside AcceleratedOptimizer
                    scaler=getattr(optimizer, "scaler", None),  # fp16 on a GPU only
                    last_step=state.max_steps - 1 if state.max_steps and state.max_steps > 0 else None)

    def on_train_end(self, args, state, control, **kwargs):
        if self.watcher is not None:
            self.watcher.close()
