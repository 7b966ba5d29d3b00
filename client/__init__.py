"""fedsynth ClientApp: a hospital's node. Images stay here; weights and scalars leave."""
