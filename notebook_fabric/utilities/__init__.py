"""Small helpers shared by the core: collection mapping, seeding, DataLoader sharding."""
