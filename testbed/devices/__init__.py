"""The hardware side: device physics, SunSpec maps, protocol servers and drivers."""
