//! The containers and volumes `isthmus inject` adds to a pod template, built as
//! k8s-openapi values: `isthmus-init` (the capture), `isthmus-proxy` (the native
//! sidecar) and the three volumes they mount. Not here: where they go in a
//! manifest, or taking them out again (the parent module and [`super::uninject`]).

use iptables_init::config::PortList;
use isthmus_vocab::ports::{
    DEFAULT_ADMIN_PORT, DEFAULT_INBOUND_PORT, DEFAULT_OUTBOUND_PORT, PROXY_UID,
};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, HTTPGetAction, Probe, ResourceRequirements,
    SecurityContext, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_yaml_ng::Value;

use super::{
    DISCOVERY_VOLUME, IDENTITY_VOLUME, INBOUND_LOOPBACK_ENV, INIT_CONTAINER, INIT_RUN_VOLUME,
    Options, PROXY_CONTAINER,
};
use crate::install;

pub(super) fn to_value<T: serde::Serialize>(object: &T) -> Value {
    serde_yaml_ng::to_value(object).expect("k8s-openapi types serialize to YAML values")
}

/// The `isthmus-init` container: the capture for the proxy's UID and ports, leaving
/// the admin port and the annotated ports alone.
pub fn init_container(
    options: &Options,
    skip_inbound: &PortList,
    skip_outbound: &PortList,
) -> Container {
    let mut inbound = format!("{DEFAULT_ADMIN_PORT}");
    if !skip_inbound.is_empty() {
        inbound = format!("{inbound},{skip_inbound}");
    }
    let mut args = vec![
        "--proxy-uid".to_owned(),
        PROXY_UID.to_string(),
        "--outbound-port".to_owned(),
        DEFAULT_OUTBOUND_PORT.to_string(),
        "--inbound-port".to_owned(),
        DEFAULT_INBOUND_PORT.to_string(),
        "--skip-inbound-ports".to_owned(),
        inbound,
    ];
    if !skip_outbound.is_empty() {
        args.extend([
            "--skip-outbound-ports".to_owned(),
            skip_outbound.to_string(),
        ]);
    }
    Container {
        name: INIT_CONTAINER.to_owned(),
        image: Some(options.image.clone()),
        image_pull_policy: Some("IfNotPresent".to_owned()),
        command: Some(vec!["isthmus-init".to_owned()]),
        args: Some(args),
        resources: Some(resources(("10m", "10Mi"), "50Mi")),
        security_context: Some(SecurityContext {
            // iptables needs root and these two capabilities in the pod's network
            // namespace, and nothing else.
            run_as_user: Some(0),
            run_as_non_root: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".to_owned(), "NET_RAW".to_owned()]),
                drop: Some(vec!["ALL".to_owned()]),
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: INIT_RUN_VOLUME.to_owned(),
            mount_path: "/run".to_owned(),
            ..VolumeMount::default()
        }]),
        ..Container::default()
    }
}

/// The proxy's UID and group (the group the CSI driver gives the identity files,
/// its fs-group), no privilege, no capability, a read-only root.
pub(crate) fn restricted() -> SecurityContext {
    SecurityContext {
        run_as_user: Some(i64::from(PROXY_UID)),
        run_as_group: Some(i64::from(PROXY_UID)),
        run_as_non_root: Some(true),
        read_only_root_filesystem: Some(true),
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_owned()]),
            ..Capabilities::default()
        }),
        ..SecurityContext::default()
    }
}

/// Requests of CPU and memory, and a memory limit. No CPU limit: throttling a
/// proxy stalls every connection of its pod, while the request already reserves
/// its share.
pub(crate) fn resources((cpu, memory): (&str, &str), memory_limit: &str) -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(
            [
                ("cpu".to_owned(), Quantity(cpu.to_owned())),
                ("memory".to_owned(), Quantity(memory.to_owned())),
            ]
            .into_iter()
            .collect(),
        ),
        limits: Some(
            [("memory".to_owned(), Quantity(memory_limit.to_owned()))]
                .into_iter()
                .collect(),
        ),
        ..ResourceRequirements::default()
    }
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::Int(i32::from(DEFAULT_ADMIN_PORT)),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(1),
        ..Probe::default()
    }
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value.to_owned()),
        ..EnvVar::default()
    }
}

/// The sidecar: `isthmus-proxy sidecar` as a native sidecar, configured through the
/// `ISTHMUS_*` environment of `isthmus-proxy`; with `inbound_loopback` it delivers
/// inbound connections to loopback rather than the pod's own address.
pub fn proxy_container(options: &Options, inbound_loopback: bool) -> Container {
    let mut env_vars = vec![
        env("ISTHMUS_CLUSTER", &options.cluster),
        env("ISTHMUS_IDENTITY_DIR", install::IDENTITY_MOUNT),
        env("ISTHMUS_MANIFESTS", install::DISCOVERY_MOUNT),
        env(
            "ISTHMUS_ADMIN_ADDR",
            &format!("0.0.0.0:{DEFAULT_ADMIN_PORT}"),
        ),
        env("ISTHMUS_LOG_FORMAT", "json"),
    ];
    if inbound_loopback {
        env_vars.push(env(INBOUND_LOOPBACK_ENV, "true"));
    }
    Container {
        name: PROXY_CONTAINER.to_owned(),
        image: Some(options.image.clone()),
        image_pull_policy: Some("IfNotPresent".to_owned()),
        command: Some(vec!["isthmus-proxy".to_owned()]),
        args: Some(vec!["sidecar".to_owned()]),
        // A native sidecar: started before the app and kept running beside it.
        restart_policy: Some("Always".to_owned()),
        env: Some(env_vars),
        ports: Some(vec![
            ContainerPort {
                name: Some(install::TUNNEL_PORT_NAME.to_owned()),
                container_port: i32::from(DEFAULT_INBOUND_PORT),
                protocol: Some("TCP".to_owned()),
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some(install::ADMIN_PORT_NAME.to_owned()),
                container_port: i32::from(DEFAULT_ADMIN_PORT),
                protocol: Some("TCP".to_owned()),
                ..ContainerPort::default()
            },
        ]),
        // The app's containers start only once this answers: their first
        // connections already find the proxy listening.
        startup_probe: Some(http_probe("/ready", 1, 120)),
        readiness_probe: Some(http_probe("/ready", 5, 3)),
        liveness_probe: Some(http_probe("/live", 10, 3)),
        resources: Some(resources(("100m", "20Mi"), "250Mi")),
        security_context: Some(restricted()),
        volume_mounts: Some(vec![
            VolumeMount {
                name: IDENTITY_VOLUME.to_owned(),
                mount_path: install::IDENTITY_MOUNT.to_owned(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: DISCOVERY_VOLUME.to_owned(),
                mount_path: install::DISCOVERY_MOUNT.to_owned(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
        ]),
        ..Container::default()
    }
}

/// The volumes the two containers mount.
pub(super) fn pod_volumes() -> Vec<Value> {
    use k8s_openapi::api::core::v1::{ConfigMapVolumeSource, EmptyDirVolumeSource, Volume};
    let volumes = [
        Volume {
            name: INIT_RUN_VOLUME.to_owned(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: Some("Memory".to_owned()),
                ..EmptyDirVolumeSource::default()
            }),
            ..Volume::default()
        },
        // Readable by the proxy's group only.
        install::identity_volume(IDENTITY_VOLUME, PROXY_UID),
        Volume {
            name: DISCOVERY_VOLUME.to_owned(),
            config_map: Some(ConfigMapVolumeSource {
                name: install::DISCOVERY_CONFIGMAP.to_owned(),
                // The proxy starts with an empty directory until the controller
                // has published; it reloads when the ConfigMap appears.
                optional: Some(true),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
    ];
    volumes.iter().map(to_value).collect()
}
