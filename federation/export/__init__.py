"""Which local services each peer cluster may reach: the ExportPolicy."""
