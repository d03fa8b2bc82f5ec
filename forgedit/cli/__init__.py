"""The offline command line, ``python -m forgedit``: edit one image on this machine.

    python -m forgedit edit photo.jpg --prompt "A photo of a sitting dog." \\
        --base-model sd-1-4 --blip blip-base --forget encoderkv,decoderattn --seeds 1,2

Subcommands:
    edit             caption → fine-tune → sweep of edits, written as PNGs, a contact sheet and
                     summary.json (or sample from a saved edit model with --load-model)
    eval             edit and score a TEdBench-layout folder (CLIP score and direction, LPIPS,
                     SSIM, PSNR; best output per pair), in process or through a server
    make-tiny-model  write the tiny deterministic test model (SD-1.x-shaped UNet + tiny BLIP)
    make-random-model  an SD-1.x pipeline with random weights (--preset sd1: SD 1.x's sizes)
    strategies       what each forgetting strategy reverts, in tensors and parameters
    build-engine     build (or load) and check a compiled UNet (TensorRT, or ONNX Runtime on a
                     CPU) ahead of time; --json prints its sizes, seconds and canary errors

Contract of ``edit``:
1. Every argument is checked before any model is loaded (the flags read into the request
   options the server's requests also become, the training and sweep configs built from them
   by ``forgedit.requests``, the image decoded under limits, --out and --save-model checked).
2. Results are staged in a hidden directory inside --out and moved into place only when the
   whole sweep has been written: --out never holds half a run.
3. Bad input of any kind prints ONE line ``error: <message>`` on stderr and exits with 2,
   without a traceback. Ctrl-C cancels at the next training update or denoising step and
   exits with 130; the first Ctrl-C cancels cleanly, a second one aborts at once.
4. Progress bars go to stderr; stdout carries only the result (``--json``: one JSON object).

One concept per module: ``parser`` (the grammar, and which flag sets which option),
``arguments`` (flags into options and configs, before any model is loaded), ``edit`` (the run,
as numbered steps), ``output`` (staged results, the report), ``progress`` (bars), ``commands``
(the other subcommands), ``main`` (exit statuses).
"""

from __future__ import annotations

from forgedit.cli.main import main

__all__ = ["main"]
