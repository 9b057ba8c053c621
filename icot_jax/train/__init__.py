"""Training: the compiled step (``step``), the host loop (``loop``) and run logs (``logs``)."""
