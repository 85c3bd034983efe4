"""Small helpers shared by the core: collection mapping, rank-zero printing, seeding."""
