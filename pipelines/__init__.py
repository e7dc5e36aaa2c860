"""The training loops: `async_loop` (streaming, the default), `sync` (generate -> train -> sync baseline), `sft`."""
