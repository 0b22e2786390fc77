"""What people look at: Grafana dashboards over the InfluxDB schema, and the HTML run report."""
