"""Retry budget and eligibility, circuit breaking, outlier ejection and fault injection."""
