"""Suite-wide settings: property tests judge correctness, not speed, on a shared 2-core machine."""

from hypothesis import HealthCheck, settings

settings.register_profile(
    "restspec", deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.load_profile("restspec")
