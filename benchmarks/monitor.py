"""What ``kgrad.callbacks.GradientMonitor`` costs inside ``fit``.

Usage::

    KERAS_BACKEND=jax python benchmarks/monitor.py [--epochs 6] [--repeats 3]

Trains the same MLP (2-64-64-64-1 tanh, 8192 samples, batch 128, so 64 steps
per epoch) with and without a monitor (``every=1``, on a 256-sample batch),
interleaved, and prints the median extra time per epoch next to the time of one
``kgrad.grad_report`` call (one forward and one backward pass on that batch).
The monitor meets its budget when the extra time per recorded epoch is about
one such call.
"""

from __future__ import annotations

import argparse
import statistics
import time

import keras
import numpy as np

import kgrad


def _model():
    keras.utils.set_random_seed(0)
    layers = [keras.Input((2,))]
    layers += [keras.layers.Dense(64, activation="tanh") for _ in range(3)]
    model = keras.Sequential([*layers, keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    return model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(8192, 2)).astype("float32")
    y = np.sin(3 * x[:, :1]) * x[:, 1:]
    xm, ym = x[:256], y[:256]
    plain_t, monitored_t, report_t = [], [], []
    for _ in range(args.repeats):
        for monitored in (False, True):
            model = _model()
            callbacks = [kgrad.callbacks.GradientMonitor(xm, ym)] if monitored else []
            model.fit(x, y, batch_size=128, epochs=1, verbose=0, callbacks=callbacks)  # warm up
            t = time.perf_counter()
            model.fit(x, y, batch_size=128, epochs=args.epochs, verbose=0, callbacks=callbacks)
            per_epoch = (time.perf_counter() - t) / args.epochs
            (monitored_t if monitored else plain_t).append(per_epoch)
            if monitored:
                kgrad.grad_report(model, xm, ym)
                t = time.perf_counter()
                kgrad.grad_report(model, xm, ym)
                report_t.append(time.perf_counter() - t)
    plain, monitored = statistics.median(plain_t), statistics.median(monitored_t)
    report = statistics.median(report_t)
    extra = monitored - plain
    print(f"backend {keras.backend.backend()}, {args.epochs} epochs x {args.repeats} rounds")
    print(f"fit, per epoch:                {plain * 1e3:8.1f} ms")
    print(f"fit + GradientMonitor:         {monitored * 1e3:8.1f} ms  (x{monitored / plain:.3f})")
    print(f"extra per recorded epoch:      {extra * 1e3:8.1f} ms")
    print(f"one grad_report (fwd + bwd):   {report * 1e3:8.1f} ms")
    print(f"extra / one grad_report:       {extra / report:8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
