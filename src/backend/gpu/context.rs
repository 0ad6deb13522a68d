//! The long-lived GPU context: adapter, device, queue, one bind group layout shared by every
//! kernel, and a lazily filled pipeline cache. Device errors never panic: they are recorded
//! and surface as [`Error::Gpu`] from the next call that checks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::kernels::Shader;
use crate::error::{Error, Result};

/// What `smelt devices` shows of an adapter.
#[derive(Clone, Debug)]
pub struct AdapterDesc {
    pub index: usize,
    pub name: String,
    pub vendor: u32,
    pub device_type: String,
    pub backend: String,
    pub driver: String,
    pub driver_info: String,
    pub max_storage_binding: u64,
    pub max_buffer: u64,
    pub max_workgroups_per_dim: u32,
    pub max_invocations: u32,
    pub max_workgroup_storage: u32,
}

impl std::fmt::Display for AdapterDesc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "[{}] {} ({}, {}, vendor {:#06x}, driver {} {})\n    max storage binding {} MiB, max buffer {} MiB, {} workgroups/dim, {} invocations/workgroup, {} KiB workgroup memory",
            self.index,
            self.name,
            self.backend,
            self.device_type,
            self.vendor,
            self.driver,
            self.driver_info,
            self.max_storage_binding >> 20,
            self.max_buffer >> 20,
            self.max_workgroups_per_dim,
            self.max_invocations,
            self.max_workgroup_storage / 1024
        )
    }
}

fn instance() -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = wgpu::Backends::from_env()
        .unwrap_or(wgpu::Backends::VULKAN | wgpu::Backends::METAL | wgpu::Backends::DX12);
    desc.flags = wgpu::InstanceFlags::from_build_config().with_env();
    wgpu::Instance::new(desc)
}

fn describe(index: usize, a: &wgpu::Adapter) -> AdapterDesc {
    let i = a.get_info();
    let l = a.limits();
    AdapterDesc {
        index,
        name: i.name,
        vendor: i.vendor,
        device_type: format!("{:?}", i.device_type),
        backend: format!("{:?}", i.backend),
        driver: i.driver,
        driver_info: i.driver_info,
        max_storage_binding: l.max_storage_buffer_binding_size,
        max_buffer: l.max_buffer_size,
        max_workgroups_per_dim: l.max_compute_workgroups_per_dimension,
        max_invocations: l.max_compute_invocations_per_workgroup,
        max_workgroup_storage: l.max_compute_workgroup_storage_size,
    }
}

fn adapters(inst: &wgpu::Instance) -> Vec<wgpu::Adapter> {
    let all = pollster::block_on(inst.enumerate_adapters(wgpu::Backends::all()));
    // GL adapters cannot run our compute kernels reliably; never pick one by accident.
    all.into_iter()
        .filter(|a| a.get_info().backend != wgpu::Backend::Gl)
        .collect()
}

/// Every usable adapter, in the order `--adapter INDEX` refers to.
pub fn list_adapters() -> Vec<AdapterDesc> {
    adapters(&instance())
        .iter()
        .enumerate()
        .map(|(i, a)| describe(i, a))
        .collect()
}

fn rank(t: wgpu::DeviceType) -> u32 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    }
}

pub struct GpuContext {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: AdapterDesc,
    pub limits: wgpu::Limits,
    pub layout: wgpu::BindGroupLayout,
    /// Group 1 of the stepped kernels (the bitonic sort): one uniform at a dynamic offset.
    pub step_layout: wgpu::BindGroupLayout,
    /// Bound as `aux` when an operation has none.
    pub dummy: wgpu::Buffer,
    pipeline_layout: wgpu::PipelineLayout,
    stepped_layout: wgpu::PipelineLayout,
    /// Keyed by the family's file name.
    modules: Mutex<HashMap<&'static str, Arc<wgpu::ShaderModule>>>,
    pipelines: Mutex<HashMap<(&'static str, &'static str), Arc<wgpu::ComputePipeline>>>,
    built: AtomicUsize,
    errors: Arc<Mutex<Vec<String>>>,
    lost: Arc<AtomicBool>,
}

impl GpuContext {
    /// Opens the adapter named by `select` (an index from `smelt devices`, or part of its
    /// name), or the best one: discrete, then integrated, then virtual, then software.
    pub fn new(select: Option<&str>) -> Result<GpuContext> {
        let inst = instance();
        let list = adapters(&inst);
        if list.is_empty() {
            return Err(Error::Gpu(
                "no GPU adapter found (Vulkan, Metal or DX12). On Linux without a GPU, install mesa-vulkan-drivers for the lavapipe software adapter".into(),
            ));
        }
        let chosen = match select {
            Some(s) => {
                let by_index = s.parse::<usize>().ok().filter(|&i| i < list.len());
                let by_name = || {
                    list.iter()
                        .position(|a| a.get_info().name.to_lowercase().contains(&s.to_lowercase()))
                };
                by_index.or_else(by_name).ok_or_else(|| {
                    let names: Vec<String> = list
                        .iter()
                        .enumerate()
                        .map(|(i, a)| format!("[{i}] {}", a.get_info().name))
                        .collect();
                    Error::Gpu(format!(
                        "no adapter matches {s:?}; available: {}",
                        names.join(", ")
                    ))
                })?
            }
            None => (0..list.len())
                .min_by_key(|&i| (rank(list[i].get_info().device_type), i))
                .unwrap(),
        };
        let adapter = &list[chosen];
        let info = describe(chosen, adapter);
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("smelt"),
            required_features: wgpu::Features::empty(),
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| Error::Gpu(format!("{}: cannot open a device: {e}", info.name)))?;

        let errors: Arc<Mutex<Vec<String>>> = Arc::default();
        let lost: Arc<AtomicBool> = Arc::default();
        {
            let sink = errors.clone();
            device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
                sink.lock().unwrap().push(e.to_string());
            }));
            let (errors, lost) = (errors.clone(), lost.clone());
            device.set_device_lost_callback(move |reason, msg| {
                lost.store(true, Ordering::SeqCst);
                errors
                    .lock()
                    .unwrap()
                    .push(format!("device lost ({reason:?}): {msg}"));
            });
        }

        let entry = |binding: u32, ty: wgpu::BindingType| wgpu::BindGroupLayoutEntry {
            binding,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty,
            count: None,
        };
        let storage = |read_only| wgpu::BindingType::Buffer {
            ty: wgpu::BufferBindingType::Storage { read_only },
            has_dynamic_offset: false,
            min_binding_size: None,
        };
        let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("smelt kernels"),
            entries: &[
                entry(0, storage(true)),
                entry(1, storage(true)),
                entry(2, storage(false)),
                entry(
                    3,
                    wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Uniform,
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                ),
                entry(4, storage(true)),
            ],
        });
        let step_layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("smelt steps"),
            entries: &[entry(
                0,
                wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Uniform,
                    has_dynamic_offset: true,
                    min_binding_size: wgpu::BufferSize::new(16),
                },
            )],
        });
        let stepped_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some("smelt stepped kernels"),
            bind_group_layouts: &[Some(&layout), Some(&step_layout)],
            immediate_size: 0,
        });
        let dummy = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("no aux"),
            size: 16,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some("smelt kernels"),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        Ok(GpuContext {
            device,
            queue,
            info,
            limits,
            layout,
            step_layout,
            dummy,
            pipeline_layout,
            stepped_layout,
            modules: Mutex::default(),
            pipelines: Mutex::default(),
            built: AtomicUsize::new(0),
            errors,
            lost,
        })
    }

    /// The pipeline of an entry point, built on first use and cached.
    pub(super) fn pipeline(
        &self,
        shader: &'static Shader,
        entry: &'static str,
    ) -> Result<Arc<wgpu::ComputePipeline>> {
        debug_assert!(
            shader.entries.contains(&entry),
            "{}: no entry point {entry}",
            shader.name
        );
        if let Some(p) = self.pipelines.lock().unwrap().get(&(shader.name, entry)) {
            return Ok(p.clone());
        }
        let t0 = std::time::Instant::now();
        let module = {
            let mut mods = self.modules.lock().unwrap();
            match mods.get(shader.name) {
                Some(m) => m.clone(),
                None => {
                    let m = Arc::new(self.device.create_shader_module(
                        wgpu::ShaderModuleDescriptor {
                            label: Some(shader.name),
                            source: wgpu::ShaderSource::Wgsl(shader.source().into()),
                        },
                    ));
                    mods.insert(shader.name, m.clone());
                    m
                }
            }
        };
        let p = Arc::new(
            self.device
                .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(entry),
                    layout: Some(if shader.stepped.contains(&entry) {
                        &self.stepped_layout
                    } else {
                        &self.pipeline_layout
                    }),
                    module: &module,
                    entry_point: Some(entry),
                    compilation_options: Default::default(),
                    cache: None,
                }),
        );
        self.check()?;
        log::debug!(
            "built pipeline {}::{entry} in {:.0} ms",
            shader.name,
            t0.elapsed().as_secs_f64() * 1e3
        );
        self.built.fetch_add(1, Ordering::Relaxed);
        self.pipelines
            .lock()
            .unwrap()
            .insert((shader.name, entry), p.clone());
        Ok(p)
    }

    /// How many pipelines were built so far (each at most once).
    pub fn pipelines_built(&self) -> usize {
        self.built.load(Ordering::Relaxed)
    }

    /// Returns the first device error recorded since the last check.
    pub fn check(&self) -> Result<()> {
        let mut e = self.errors.lock().unwrap();
        if !e.is_empty() {
            let msg = e.join("; ");
            e.clear();
            return Err(Error::Gpu(format!("{}: {msg}", self.info.name)));
        }
        if self.lost.load(Ordering::SeqCst) {
            return Err(Error::Gpu(format!(
                "{}: the device was lost",
                self.info.name
            )));
        }
        Ok(())
    }

    /// Host-to-device and device-to-host copy bandwidth (GB/s) for buffers of `bytes`, the
    /// way the engine moves data (queue writes up, copies to a mapped buffer down).
    pub fn transfer_bandwidth(&self, bytes: u64) -> Result<(f64, f64)> {
        let bytes = bytes.min(self.limits.max_buffer_size).max(4) / 4 * 4;
        let dev = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("bandwidth"),
            size: bytes,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_DST
                | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let rb = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("bandwidth readback"),
            size: bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let host = vec![1u8; bytes as usize];
        // warm up once, then time
        let mut up = f64::MAX;
        let mut down = f64::MAX;
        for _ in 0..3 {
            let t = std::time::Instant::now();
            self.queue.write_buffer(&dev, 0, &host);
            self.queue.submit([]);
            self.wait()?;
            up = up.min(t.elapsed().as_secs_f64());
            let t = std::time::Instant::now();
            let mut enc = self.device.create_command_encoder(&Default::default());
            enc.copy_buffer_to_buffer(&dev, 0, &rb, 0, bytes);
            self.queue.submit([enc.finish()]);
            let (tx, rx) = std::sync::mpsc::channel();
            rb.slice(..).map_async(wgpu::MapMode::Read, move |r| {
                let _ = tx.send(r);
            });
            self.wait()?;
            rx.recv()
                .map_err(|_| Error::Gpu("readback abandoned".into()))?
                .map_err(|e| Error::Gpu(e.to_string()))?;
            {
                let view = rb
                    .slice(..)
                    .get_mapped_range()
                    .map_err(|e| Error::Gpu(e.to_string()))?;
                std::hint::black_box(view[0]);
            }
            rb.unmap();
            down = down.min(t.elapsed().as_secs_f64());
        }
        Ok((bytes as f64 / up / 1e9, bytes as f64 / down / 1e9))
    }

    /// Waits for all submitted work.
    pub fn wait(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Gpu(format!("{}: {e}", self.info.name)))?;
        self.check()
    }
}
