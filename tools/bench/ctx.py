"""The run context: torch, the device, dmattn_cupy (or why it is missing), the peers that
are importable (FlashAttention-4 detected once, its reason printed once), compiled
FlexAttention, and the timer."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from .timing import Timer


class Ctx:
    def __init__(self, args: argparse.Namespace, dm: Any = None):
        import torch

        self.torch = torch
        self.args = args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.peers: set[str] = args.peer_set
        self.dm = dm
        self.dm_error = ""
        if self.dm is None:
            try:
                import dmattn_cupy

                self.dm = dmattn_cupy
            except Exception as e:  # noqa: BLE001 - report and go on
                self.dm_error = f"import dmattn_cupy failed: {type(e).__name__}: {e}"
        self._flex: Any = None
        self._flex_error = ""
        self._fa4: Any = None
        self.fa4_error = ""
        self.fa4_version = ""
        if self.peers & {"fa4", "flex-flash"}:
            self._detect_fa4()
        self.copy_bw: float | None = None
        self.l2_bytes = 50 * 2**20
        if self.cuda:
            props = torch.cuda.get_device_properties(self.device)
            self.l2_bytes = int(getattr(props, "L2_cache_size", 0) or self.l2_bytes)
        self.timer = Timer(torch, self.device, args)

    # -- dmattn ------------------------------------------------------------------------
    def dm_attr(self, name: str) -> Any:
        if self.dm is None:
            raise ImportError(self.dm_error or "dmattn_cupy is not importable")
        if not hasattr(self.dm, name):
            raise NotImplementedError(f"dmattn_cupy has no {name}")
        return getattr(self.dm, name)

    # -- FlashAttention-4 --------------------------------------------------------------
    def _detect_fa4(self) -> None:
        """``from flash_attn.cute import flash_attn_func``; on failure keep the reason (the
        header prints it once; the rows say n/a)."""
        if not self.cuda:
            self.fa4_error = "FA4 needs a CUDA device"
            return
        try:
            import flash_attn.cute as fa4
            from flash_attn.cute import flash_attn_func

            self._fa4 = flash_attn_func
            self.fa4_version = str(getattr(fa4, "__version__", ""))
        except Exception as e:  # noqa: BLE001
            self.fa4_error = f"import flash_attn.cute failed: {type(e).__name__}: {e}"

    def fa4(self) -> Callable[..., Any]:
        """FA4's ``flash_attn_func`` (returns ``(out, lse)``), or raise with the reason."""
        if self._fa4 is None:
            raise ImportError("flash_attn.cute not importable (reason printed in the header)"
                              if self.fa4_error else "FA4 not detected")
        return self._fa4

    def peer_lines(self) -> list[str]:
        """One line per optional peer that is selected but unavailable (printed once)."""
        lines = []
        if self.peers & {"fa4", "flex-flash"} and self._fa4 is None:
            lines.append(f"peer fa4 / flex-flash: n/a: {self.fa4_error}")
        elif self._fa4 is not None:
            lines.append(f"peer fa4: flash_attn.cute {self.fa4_version}".rstrip())
        return lines

    # -- FlexAttention -----------------------------------------------------------------
    def flex(self) -> Any:
        if self._flex is None and not self._flex_error:
            try:
                from torch.nn.attention.flex_attention import flex_attention

                if self.args.flex_mode == "compile":
                    self._flex = self.torch.compile(flex_attention, dynamic=False)
                else:
                    self._flex = flex_attention
            except Exception as e:  # noqa: BLE001
                self._flex_error = f"{type(e).__name__}: {e}"
        if self._flex is None:
            raise RuntimeError(f"FlexAttention unavailable: {self._flex_error}")
        return self._flex

    def new_case(self) -> None:
        """A fresh compiled FlexAttention per case (compile once per case)."""
        torch = self.torch
        self._flex = None
        self._flex_error = ""
        try:
            torch._dynamo.reset()
        except Exception:  # noqa: BLE001
            pass
        try:
            cfg = torch._dynamo.config
            for name in ("cache_size_limit", "recompile_limit",
                         "accumulated_cache_size_limit", "accumulated_recompile_limit"):
                if hasattr(cfg, name):
                    setattr(cfg, name, max(int(getattr(cfg, name)), 256))
        except Exception:  # noqa: BLE001
            pass
        if self.cuda:
            torch.cuda.empty_cache()

    # -- timing ------------------------------------------------------------------------
    @property
    def cycles_per_ms(self) -> float | None:
        return self.timer.cycles_per_ms

    def sync(self) -> None:
        self.timer.sync()

    def time_calls(self, fns: Any) -> dict[str, Any]:
        return self.timer.time_calls(fns)

    def host_per_call(self, fn: Callable[[], Any], calls: int) -> dict[str, Any]:
        return self.timer.host_per_call(fn, calls)

    def copy_bandwidth(self) -> float | None:
        return self.timer.copy_bandwidth()
