"""What every training stage shares: the resumable loop (`loop`) and its saved state (`state`), batch
plans (`batches`), several processes (`distributed`), the optimizers (`optimizers`) and the process's
allocator setting (`allocator`)."""
