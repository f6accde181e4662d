//! `qmesh up --http ADDR`: the agent's own `/metrics`, in the Prometheus
//! text format, from an explicit `prometheus-client` registry (no global
//! one), served by axum on a loopback address.
//!
//! The counts live in the routes themselves ([`RouteStats`], kept per route
//! across reloads); a collector reads them at each scrape.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{bail, Context, Result};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use qmesh_client::forward::RouteStats;
use qmesh_client::Path;
use tokio::net::TcpListener;

/// The agent's routes and their counts, by route (`expose.NAME`,
/// `forward.NAME`).
#[derive(Debug, Default)]
pub(crate) struct AgentMetrics {
    routes: Mutex<BTreeMap<String, Arc<RouteStats>>>,
}

impl AgentMetrics {
    /// The counts of `route`, made on first use; a route changed by a
    /// reload keeps counting in the same ones.
    pub(crate) fn route(&self, route: &str) -> Arc<RouteStats> {
        let mut routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
        routes.entry(route.to_owned()).or_default().clone()
    }

    /// `route` was removed: it is no longer reported.
    pub(crate) fn remove(&self, route: &str) {
        let mut routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
        routes.remove(route);
    }

    fn snapshot(&self) -> Vec<(String, Arc<RouteStats>)> {
        let routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
        routes.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

impl Collector for AgentMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let routes = self.snapshot();
        let count = ConstGauge::new(routes.len() as i64);
        count.encode(encoder.encode_descriptor(
            "qmesh_agent_routes",
            "Routes the agent runs (exposed and forwarded)",
            None,
            MetricType::Gauge,
        )?)?;
        {
            let mut family = encoder.encode_descriptor(
                "qmesh_agent_connections",
                "Connections (UDP flows) each route carries now",
                None,
                MetricType::Gauge,
            )?;
            for (route, stats) in &routes {
                let open = ConstGauge::new(i64::try_from(stats.open()).unwrap_or(i64::MAX));
                open.encode(family.encode_family(&[("route", route.as_str())])?)?;
            }
        }
        {
            // The text format adds `_total` to a counter's name.
            let mut family = encoder.encode_descriptor(
                "qmesh_agent_connections",
                "Connections (UDP flows) each route has taken on, those refused at its limit not counted",
                None,
                MetricType::Counter,
            )?;
            for (route, stats) in &routes {
                let total = ConstCounter::new(stats.total());
                total.encode(family.encode_family(&[("route", route.as_str())])?)?;
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "qmesh_agent_bytes",
                "Bytes each route carried: sent from the local side into the mesh, received from the mesh to the local side (UDP: payload bytes)",
                None,
                MetricType::Counter,
            )?;
            for (route, stats) in &routes {
                for (direction, bytes) in [
                    ("sent", stats.bytes_sent()),
                    ("received", stats.bytes_received()),
                ] {
                    let labels = [("route", route.as_str()), ("direction", direction)];
                    ConstCounter::new(bytes).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "qmesh_agent_route_path",
                "A forward's path now: 1 for its channel's path (relay or direct), 0 for the other; exposed routes have one channel per peer and are not listed",
                None,
                MetricType::Gauge,
            )?;
            for (route, stats) in &routes {
                let Some(path) = stats.path() else { continue };
                let direct = matches!(path, Path::Direct { .. });
                for (name, now) in [("relay", !direct), ("direct", direct)] {
                    let labels = [("route", route.as_str()), ("path", name)];
                    ConstGauge::new(i64::from(now)).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        Ok(())
    }
}

/// Bind `addr` for `/metrics`: loopback only, since the page needs no
/// credential.
pub(crate) async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    if !addr.ip().is_loopback() {
        bail!(
            "--http {addr}: the agent serves its metrics on a loopback address only \
             (127.0.0.0/8 or [::1]), as they need no credential; scrape it from this host, \
             or put an authenticating proxy in front"
        );
    }
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("--http {addr}: cannot listen"))
}

/// Serve `/metrics` from `metrics` on `listener` until the process ends.
pub(crate) fn serve(listener: TcpListener, metrics: Arc<AgentMetrics>) {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(metrics));
    let registry = Arc::new(registry);
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let registry = registry.clone();
            async move { scrape(&registry) }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(cause = %e, "the metrics listener failed");
        }
    });
}

/// The registry as Prometheus text.
fn scrape(registry: &Registry) -> axum::response::Response {
    use prometheus_client::encoding::prometheus_text::{encode, CONTENT_TYPE};
    let mut text = String::new();
    match encode(&mut text, registry) {
        Ok(()) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "encoding the metrics failed",
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(metrics: Arc<AgentMetrics>) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(metrics));
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &registry)
            .expect("encoding");
        text
    }

    #[test]
    fn each_route_has_its_counts_and_a_removed_one_goes() {
        let metrics = Arc::new(AgentMetrics::default());
        let web = metrics.route("forward.web");
        assert!(Arc::ptr_eq(&web, &metrics.route("forward.web")));
        metrics.route("expose.ssh");
        let text = text(metrics.clone());
        for line in [
            "# TYPE qmesh_agent_routes gauge",
            "qmesh_agent_routes 2",
            "# TYPE qmesh_agent_connections gauge",
            "qmesh_agent_connections{route=\"forward.web\"} 0",
            "# TYPE qmesh_agent_connections_total counter",
            "qmesh_agent_connections_total{route=\"expose.ssh\"} 0",
            "# TYPE qmesh_agent_bytes_total counter",
            "qmesh_agent_bytes_total{route=\"forward.web\",direction=\"sent\"} 0",
            "qmesh_agent_bytes_total{route=\"forward.web\",direction=\"received\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        // No path before a forward's channel is open.
        assert!(!text.contains("qmesh_agent_route_path{"), "{text}");
        metrics.remove("expose.ssh");
        let text = self::text(metrics);
        assert!(text.contains("qmesh_agent_routes 1\n"), "{text}");
        assert!(!text.contains("expose.ssh"), "{text}");
    }

    #[tokio::test]
    async fn only_loopback_addresses_are_served() {
        let err = bind("0.0.0.0:0".parse().expect("address"))
            .await
            .expect_err("refused");
        assert!(format!("{err}").contains("loopback address only"), "{err}");
        let listener = bind("127.0.0.1:0".parse().expect("address"))
            .await
            .expect("loopback");
        assert!(listener.local_addr().expect("bound").ip().is_loopback());
    }
}
