//! Kubernetes objects for a job, one directory per region: a cluster per region is the normal
//! case, and the coordinator's region holds the coordinator too. `kubectl apply -k DIR/REGION`
//! applies one region's objects; `monitoring/` holds a ServiceMonitor for clusters that run the
//! Prometheus Operator.
//!
//! Both processes run to completion (the coordinator exits once the job is done, a learner once
//! told so), so both are Jobs with `restartPolicy: OnFailure`: a crashed or killed process is
//! restarted and resumes (the coordinator from its volume, a learner by rejoining), and a
//! finished one stays finished, where a Deployment or StatefulSet would start it again.

use crate::{Launch, RegionLaunch, RenderedFile};
use anyhow::Result;
use serde_json::{json, Value};

/// Where the recipe, the TLS material and the run directory are in every container.
/// (Each volume in a directory of its own: a mount point inside a ConfigMap volume cannot be
/// created.)
const RECIPE_DIR: &str = "/etc/atoll/recipe";
const RECIPE_PATH: &str = "/etc/atoll/recipe/recipe.yaml";
const TLS_DIR: &str = "/etc/atoll/tls";
const RUN_DIR: &str = "/var/lib/atoll/run";
/// The user the image runs as (`deploy/Dockerfile`).
const USER_ID: u64 = 10001;

pub fn render(launch: &Launch) -> Result<Vec<RenderedFile>> {
    let mut files = Vec::new();
    for (i, region) in launch.regions.iter().enumerate() {
        let dir = std::path::PathBuf::from(&region.label);
        let mut resources: Vec<(&str, Vec<Value>)> = vec![
            ("namespace.yaml", vec![namespace(launch)]),
            ("recipe-configmap.yaml", vec![recipe_config_map(launch)]),
        ];
        if i == launch.coordinator_region {
            resources.push(("coordinator.yaml", coordinator(launch)?));
        }
        resources.push(("learner.yaml", vec![learner(launch, region)?]));
        resources.push(("metrics-service.yaml", vec![metrics_service(launch)]));
        let kustomization = json!({
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": resources.iter().map(|(name, _)| *name).collect::<Vec<_>>(),
        });
        for (name, objects) in resources {
            files.push(RenderedFile {
                path: dir.join(name),
                contents: documents(&objects)?,
                executable: false,
            });
        }
        files.push(RenderedFile {
            path: dir.join("kustomization.yaml"),
            contents: documents(&[kustomization])?,
            executable: false,
        });
        files.push(RenderedFile {
            path: dir.join("monitoring/servicemonitor.yaml"),
            contents: documents(&[service_monitor(launch)])?,
            executable: false,
        });
    }
    Ok(files)
}

fn documents(objects: &[Value]) -> Result<String> {
    let mut out = String::from("# Rendered by `atoll deploy k8s`; see docs/deploy.md.\n");
    for (i, o) in objects.iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        out.push_str(&serde_yaml::to_string(o)?);
    }
    Ok(out)
}

fn name(launch: &Launch, what: &str) -> String {
    format!("atoll-{}-{what}", launch.job)
}

fn labels(launch: &Launch, component: &str, region: Option<&RegionLaunch>) -> Value {
    let mut l = json!({
        "app.kubernetes.io/name": "atoll",
        "app.kubernetes.io/instance": launch.job,
        "app.kubernetes.io/component": component,
    });
    if let Some(r) = region {
        l["atoll.dev/region"] = json!(r.label);
    }
    l
}

fn metadata(launch: &Launch, name: String, labels: Value) -> Value {
    json!({"name": name, "namespace": launch.deploy.k8s.namespace, "labels": labels})
}

fn namespace(launch: &Launch) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": launch.deploy.k8s.namespace},
    })
}

fn recipe_config_map(launch: &Launch) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(launch, name(launch, "recipe"), labels(launch, "recipe", None)),
        "data": {"recipe.yaml": launch.recipe_yaml},
    })
}

/// What differs between the coordinator's container and a learner's.
struct ContainerSpec<'a> {
    component: &'a str,
    image: &'a str,
    args: Vec<String>,
    metrics_port: u16,
    extra_ports: Vec<Value>,
    resources: Value,
    mounts: Vec<Value>,
}

/// What every process's container shares: the secret from its Secret, object-store
/// credentials, probes on the metrics port, no privileges.
fn container(launch: &Launch, spec: ContainerSpec) -> Value {
    let k = &launch.deploy.k8s;
    let mut ports =
        vec![json!({"name": "metrics", "containerPort": spec.metrics_port, "protocol": "TCP"})];
    ports.extend(spec.extra_ports);
    let probe = |period: u64, failures: u64| {
        json!({
            "httpGet": {"path": "/metrics", "port": "metrics"},
            "periodSeconds": period,
            "timeoutSeconds": 5,
            "failureThreshold": failures,
        })
    };
    let mut c = json!({
        "name": spec.component,
        "image": spec.image,
        "imagePullPolicy": "IfNotPresent",
        "args": spec.args,
        "env": [
            {"name": "ATOLL_SECRET", "valueFrom": {"secretKeyRef": {"name": k.secret, "key": "secret"}}},
            {"name": "RUST_LOG", "value": "info"},
        ],
        "ports": ports,
        // Building the model (or loading `model.init_from`) comes before the endpoint serves:
        // up to 15 minutes before liveness counts.
        "startupProbe": probe(10, 90),
        "livenessProbe": probe(20, 3),
        "readinessProbe": probe(10, 3),
        "resources": spec.resources,
        "securityContext": {
            "allowPrivilegeEscalation": false,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": spec.mounts,
    });
    if let Some(store) = &k.store_secret {
        c["envFrom"] = json!([{"secretRef": {"name": store}}]);
    }
    c
}

fn resources(cpus: usize, memory_gb: usize, gpus: usize) -> Value {
    let mut requests = json!({"cpu": cpus.to_string(), "memory": format!("{memory_gb}Gi")});
    let mut limits = json!({"memory": format!("{memory_gb}Gi")});
    if gpus > 0 {
        requests["nvidia.com/gpu"] = json!(gpus.to_string());
        limits["nvidia.com/gpu"] = json!(gpus.to_string());
    }
    json!({"requests": requests, "limits": limits})
}

fn job(launch: &Launch, name: String, labels: Value, annotations: Value, pod: Value) -> Value {
    json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata(launch, name, labels.clone()),
        "spec": {
            "backoffLimit": launch.deploy.k8s.backoff_limit.0,
            "template": {
                "metadata": {"labels": labels, "annotations": annotations},
                "spec": pod,
            },
        },
    })
}

fn scrape_annotations(port: u16) -> Value {
    json!({
        "prometheus.io/scrape": "true",
        "prometheus.io/port": port.to_string(),
        "prometheus.io/path": "/metrics",
    })
}

fn pod_security() -> Value {
    json!({
        "runAsNonRoot": true,
        "runAsUser": USER_ID,
        "runAsGroup": USER_ID,
        "fsGroup": USER_ID,
    })
}

fn recipe_volume(launch: &Launch) -> Value {
    json!({"name": "recipe", "configMap": {"name": name(launch, "recipe")}})
}

fn recipe_mount() -> Value {
    json!({"name": "recipe", "mountPath": RECIPE_DIR, "readOnly": true})
}

/// The coordinator: its volume (state, merges, local checkpoints, the final model), the Job,
/// and the Service learners reach it through (TCP for gRPC, UDP for QUIC, one port).
fn coordinator(launch: &Launch) -> Result<Vec<Value>> {
    let d = &launch.deploy;
    let c = &d.coordinator;
    let region = launch.coordinator_region();
    let image = launch.image_for(region)?;
    let component_labels = labels(launch, "coordinator", Some(region));
    let mut pvc_spec = json!({
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": format!("{}Gi", d.k8s.storage_gb.0)}},
    });
    if let Some(class) = &d.k8s.storage_class {
        pvc_spec["storageClassName"] = json!(class);
    }
    let pvc = json!({
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": metadata(launch, name(launch, "coordinator"), component_labels.clone()),
        "spec": pvc_spec,
    });
    let mut args: Vec<String> = [
        "coordinator",
        RECIPE_PATH,
        "--listen",
        &format!("0.0.0.0:{}", c.port),
        "--run-dir",
        RUN_DIR,
        "--metrics",
        &format!("0.0.0.0:{}", c.metrics_port),
    ]
    .map(String::from)
    .to_vec();
    if let Some(host) = launch.coordinator_public_host() {
        args.extend(["--host".into(), host]);
    }
    let main = container(
        launch,
        ContainerSpec {
            component: "coordinator",
            image,
            args,
            metrics_port: c.metrics_port,
            extra_ports: vec![
                json!({"name": "grpc", "containerPort": c.port, "protocol": "TCP"}),
                json!({"name": "quic", "containerPort": c.port, "protocol": "UDP"}),
            ],
            resources: resources(c.cpus.0, c.memory_gb.0, 0),
            mounts: vec![
                recipe_mount(),
                json!({"name": "run", "mountPath": RUN_DIR}),
                // The job's CA and server certificate where the coordinator looks for them: it
                // then creates none of its own.
                json!({"name": "tls", "mountPath": format!("{RUN_DIR}/tls"), "readOnly": true}),
            ],
        },
    );
    let pod = json!({
        "restartPolicy": "OnFailure",
        "securityContext": pod_security(),
        "containers": [main],
        "volumes": [
            recipe_volume(launch),
            {"name": "run", "persistentVolumeClaim": {"claimName": name(launch, "coordinator")}},
            {"name": "tls", "secret": {"secretName": d.k8s.tls_secret, "defaultMode": 0o440}},
        ],
    });
    let job = job(
        launch,
        name(launch, "coordinator"),
        component_labels.clone(),
        scrape_annotations(c.metrics_port),
        pod,
    );
    let selector = json!({
        "app.kubernetes.io/instance": launch.job,
        "app.kubernetes.io/component": "coordinator",
    });
    let mut grpc = json!({"name": "grpc", "port": c.port, "targetPort": c.port, "protocol": "TCP"});
    let mut quic = json!({"name": "quic", "port": c.port, "targetPort": c.port, "protocol": "UDP"});
    if d.k8s.service_type == atoll_recipe::deploy::ServiceType::NodePort {
        // Learners dial the port the coordinator announces: the node port must be that one.
        if !(30000..=32767).contains(&c.port) {
            anyhow::bail!(
                "deploy.coordinator.port: {} is outside the NodePort range 30000-32767 that \
                 deploy.k8s.service_type NodePort needs (the coordinator announces its own port)",
                c.port
            );
        }
        grpc["nodePort"] = json!(c.port);
        quic["nodePort"] = json!(c.port);
    }
    let service = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(launch, name(launch, "coordinator"), component_labels),
        "spec": {
            "type": format!("{:?}", d.k8s.service_type),
            "selector": selector,
            "ports": [grpc, quic],
        },
    });
    Ok(vec![pvc, job, service])
}

fn learner(launch: &Launch, region: &RegionLaunch) -> Result<Value> {
    let d = &launch.deploy;
    let image = launch.image_for(region)?;
    let address = if region.name == launch.coordinator_region().name {
        // In the coordinator's cluster: through its Service, not out and back in.
        region.own_coordinator_address.clone().unwrap_or_else(|| {
            format!(
                "{}.{}.svc:{}",
                name(launch, "coordinator"),
                d.k8s.namespace,
                d.coordinator.port
            )
        })
    } else {
        launch.address_for(region)?.to_string()
    };
    let args: Vec<String> = [
        "learner",
        RECIPE_PATH,
        "--region",
        &region.name,
        "--coordinator",
        &address,
        "--ca",
        &format!("{TLS_DIR}/ca.pem"),
        "--run-dir",
        RUN_DIR,
        "--metrics",
        &format!("0.0.0.0:{}", d.learner_metrics_port),
        // A sharded learner's ranks are processes of this one pod (rank 0 starts the others).
        "--ranks",
        &region.ranks.to_string(),
    ]
    .map(String::from)
    .to_vec();
    let main = container(
        launch,
        ContainerSpec {
            component: "learner",
            image,
            args,
            metrics_port: d.learner_metrics_port,
            extra_ports: Vec::new(),
            resources: resources(
                region.cpus * region.ranks,
                region.memory_gb * region.ranks,
                region.gpus * region.ranks,
            ),
            mounts: vec![
                recipe_mount(),
                json!({"name": "tls", "mountPath": TLS_DIR, "readOnly": true}),
                json!({"name": "run", "mountPath": RUN_DIR}),
            ],
        },
    );
    let pod = json!({
        "restartPolicy": "OnFailure",
        "securityContext": pod_security(),
        "containers": [main],
        "volumes": [
            recipe_volume(launch),
            // Only the CA certificate: learners' clusters need nothing else of the TLS material.
            {"name": "tls", "secret": {
                "secretName": d.k8s.tls_secret,
                "items": [{"key": "ca.pem", "path": "ca.pem"}],
                "defaultMode": 0o440,
            }},
            // A restarted learner rejoins and continues from the step it reported: nothing
            // local needs to outlive the pod.
            {"name": "run", "emptyDir": {}},
        ],
    });
    Ok(job(
        launch,
        name(launch, &format!("learner-{}", region.label)),
        labels(launch, "learner", Some(region)),
        scrape_annotations(d.learner_metrics_port),
        pod,
    ))
}

/// A headless Service over every process of the job in this cluster, for the ServiceMonitor
/// (the port is named, so each pod's own metrics port is used).
fn metrics_service(launch: &Launch) -> Value {
    let mut l = labels(launch, "metrics", None);
    l["atoll.dev/metrics"] = json!("true");
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(launch, name(launch, "metrics"), l),
        "spec": {
            "clusterIP": "None",
            "selector": {"app.kubernetes.io/name": "atoll", "app.kubernetes.io/instance": launch.job},
            "ports": [{"name": "metrics", "port": launch.deploy.coordinator.metrics_port, "targetPort": "metrics", "protocol": "TCP"}],
        },
    })
}

fn service_monitor(launch: &Launch) -> Value {
    json!({
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": metadata(launch, name(launch, "metrics"), labels(launch, "metrics", None)),
        "spec": {
            "selector": {"matchLabels": {
                "app.kubernetes.io/instance": launch.job,
                "atoll.dev/metrics": "true",
            }},
            "endpoints": [{"port": "metrics", "path": "/metrics", "interval": "15s"}],
            "podTargetLabels": ["atoll.dev/region", "app.kubernetes.io/component"],
        },
    })
}
