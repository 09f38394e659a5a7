"""Operations: Prometheus metrics (`/metrics`) and structured JSON logs."""
