//! The commands that change a running lab from another terminal: `isthmus lab
//! apply FILE...` and `isthmus lab delete FILE...` (manifests onto one cluster's
//! API server, as kubectl would), and `isthmus lab kubeconfig CLUSTER` (for
//! kubectl itself). The running lab is found through its record in
//! `/run/isthmus-lab/<prefix>/`: its pid, alive, and a kubeconfig per cluster
//! in `kube/<cluster>/kubeconfig`.
//!
//! Not here: starting or stopping a lab ([`super::run`], [`super::net`]).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use kube::config::{KubeConfigOptions, Kubeconfig};

use super::apply::{self, Verb};
use super::net::{RUN_ROOT, is_lab};

/// `isthmus lab apply` and `isthmus lab delete`.
#[derive(Debug, Args)]
pub struct ChangeArgs {
    /// Manifest files (multi-document YAML).
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// The cluster to change [default: the folder holding each file, named as
    /// the cluster, as in `isthmus lab up DIR`].
    #[arg(long)]
    pub cluster: Option<String>,
    #[command(flatten)]
    pub lab: Running,
}

/// Which running lab.
#[derive(Debug, Args)]
pub struct Running {
    /// The running lab, by prefix (`isl...`) [default: the only one running].
    #[arg(long, value_name = "PREFIX")]
    pub run: Option<String>,
}

/// `isthmus lab kubeconfig`.
#[derive(Debug, Args)]
pub struct KubeconfigArgs {
    /// The cluster.
    pub cluster: String,
    #[command(flatten)]
    pub lab: Running,
}

/// The record directory of the running lab `prefix`, or of the only one.
fn find_run(prefix: Option<&str>) -> Result<PathBuf> {
    let mut live = Vec::new();
    for entry in std::fs::read_dir(RUN_ROOT).into_iter().flatten().flatten() {
        let dir = entry.path();
        let alive = std::fs::read_to_string(dir.join("pid"))
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
            .is_some_and(is_lab);
        if alive && dir.join("kube").is_dir() {
            live.push(dir);
        }
    }
    let name = |d: &PathBuf| d.file_name().map(|n| n.to_string_lossy().into_owned());
    match prefix {
        Some(p) => live
            .into_iter()
            .find(|d| name(d).as_deref() == Some(p))
            .with_context(|| format!("--run {p}: no such lab is running (see {RUN_ROOT})")),
        None => match live.len() {
            0 => bail!("no lab is running: start one with `isthmus lab up DIR`"),
            1 => Ok(live.remove(0)),
            _ => bail!(
                "{} labs are running ({}): choose one with --run",
                live.len(),
                live.iter().filter_map(name).collect::<Vec<_>>().join(", ")
            ),
        },
    }
}

/// The admin kubeconfig of `cluster` in the run at `run`.
fn kubeconfig_path(run: &Path, cluster: &str) -> Result<PathBuf> {
    let path = run.join("kube").join(cluster).join("kubeconfig");
    if path.is_file() {
        return Ok(path);
    }
    let clusters: Vec<String> = std::fs::read_dir(run.join("kube"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    bail!(
        "the lab {} has no cluster {cluster:?} (clusters: {})",
        run.display(),
        clusters.join(", ")
    )
}

/// Prints the kubeconfig of a running lab's cluster.
pub fn kubeconfig(args: &KubeconfigArgs) -> Result<()> {
    let run = find_run(args.lab.run.as_deref())?;
    let path = kubeconfig_path(&run, &args.cluster)?;
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    print!("{text}");
    Ok(())
}

/// Applies or deletes the files of `args` on the running lab.
pub fn change(verb: Verb, args: &ChangeArgs) -> Result<()> {
    let run = find_run(args.lab.run.as_deref())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        for file in &args.files {
            let cluster = match &args.cluster {
                Some(c) => c.clone(),
                None => file
                    .canonicalize()
                    .ok()
                    .and_then(|f| {
                        f.parent()
                            .and_then(|p| p.file_name())
                            .map(|n| n.to_string_lossy().into_owned())
                    })
                    .with_context(|| {
                        format!("{}: name the cluster with --cluster", file.display())
                    })?,
            };
            let path = kubeconfig_path(&run, &cluster).with_context(|| {
                format!(
                    "{}: pass --cluster, or keep it in a folder named as the cluster",
                    file.display()
                )
            })?;
            let config = Kubeconfig::read_from(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let config =
                kube::Config::from_custom_kubeconfig(config, &KubeConfigOptions::default())
                    .await
                    .with_context(|| format!("using {}", path.display()))?;
            let client = kube::Client::try_from(config).context("building an API client")?;
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("reading {}", file.display()))?;
            let origin = file.display().to_string();
            let done = apply::run(&client, verb, &origin, &text).await?;
            let word = match verb {
                Verb::Apply => "applied",
                Verb::Delete => "deleted",
            };
            for what in done {
                println!("{cluster}: {what} {word}");
            }
        }
        Ok(())
    })
}
