"""What a run stands on below the numerics: its processes (`jax.distributed`) and their local launch,
host memory, the run directory's lock and log, and storage paths (local or any `etils.epath` URL)."""
