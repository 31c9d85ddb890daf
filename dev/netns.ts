/**
 * Several "hosts" on one machine (issue 17): each host is a Linux network namespace of its own, joined to the others
 * by a veth pair on one bridge, with an address of its own in a /24 that exists only inside this lab. Processes run
 * in a host with `lab.spawn(host, command, args)`; `partition(host)` takes its link down (the host stays alive and
 * keeps its sockets, it just hears nothing: a cut cable, not a crash) and `heal(host)` brings it back.
 *
 * Needs root and iproute2 (`ip netns`, veth, bridge). Traffic stays inside the namespaces and the bridge this lab
 * created: the bridge has an address in the lab's subnet so that the creating process (in the root namespace) can
 * reach the hosts, and nothing routes the subnet anywhere else. `destroy()` removes everything it made; a lab left
 * behind by a killed run is removed by the next `NetnsLab.create` with the same name.
 */
import { execFileSync, spawn, type ChildProcess, type SpawnOptions } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { isProcessAlive } from '../src/util';

/** Why namespaces cannot be made here, or null when they can. */
export function netnsUnavailable(): string | null {
  if (process.platform !== 'linux') return `network namespaces need Linux (this is ${process.platform})`;
  if (typeof process.getuid === 'function' && process.getuid() !== 0) return 'network namespaces need root (ip netns add)';
  try {
    execFileSync('ip', ['-V'], { stdio: 'ignore' });
  } catch {
    return 'iproute2 (the ip command) is not installed';
  }
  const probe = `flprobe${process.pid % 100_000}`;
  try {
    execFileSync('ip', ['netns', 'add', probe], { stdio: 'pipe' });
    execFileSync('ip', ['netns', 'del', probe], { stdio: 'pipe' });
  } catch (err) {
    return `ip netns add failed: ${String((err as { stderr?: Buffer }).stderr ?? err)
      .trim()
      .slice(0, 200)}`;
  }
  return null;
}

function ip(...args: string[]): void {
  execFileSync('ip', args, { stdio: 'pipe' });
}

function tryIp(...args: string[]): void {
  try {
    ip(...args);
  } catch {
    // already gone
  }
}

export interface LabHost {
  readonly name: string;
  /** the namespace's name */
  readonly netns: string;
  /** its address on the lab's bridge */
  readonly address: string;
  /** the bridge side of its veth pair (taken down by `partition`) */
  readonly link: string;
}

/** Where the process that owns a lab of a name records its pid while the lab lives. */
function labClaimFile(name: string): string {
  return path.join(os.tmpdir(), `lifecycle-fleet-netns-${name}.pid`);
}

/**
 * Claims the lab's name for this process, or refuses when a live process holds it: making the lab would first
 * remove that run's namespaces and bridge (as a killed run's are removed) and break it mid-run. A claim whose
 * process is gone (a killed run) is taken over.
 */
function claimLab(name: string): void {
  const file = labClaimFile(name);
  for (;;) {
    try {
      fs.writeFileSync(file, String(process.pid), { flag: 'wx' });
      return;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    }
    const holder = Number(fs.readFileSync(file, 'utf8').trim());
    if (Number.isInteger(holder) && holder > 0 && holder !== process.pid && isProcessAlive(holder)) {
      throw new Error(`netns lab ${name} is in use by process ${holder} (another run on this machine); wait for it to end, or run one at a time`);
    }
    fs.rmSync(file, { force: true }); // its process is gone: a killed run's
  }
}

function releaseLab(name: string): void {
  const file = labClaimFile(name);
  try {
    if (fs.readFileSync(file, 'utf8').trim() === String(process.pid)) fs.rmSync(file, { force: true });
  } catch {
    // not claimed (any more): nothing to release
  }
}

export class NetnsLab {
  private readonly children = new Set<ChildProcess>();

  private constructor(
    /** a short name (letters and digits, up to 6): namespaces are `fl-<name>-<host>` */
    readonly name: string,
    readonly bridge: string,
    /** the address of the bridge (the root namespace's address in the lab) */
    readonly gateway: string,
    readonly hosts: ReadonlyMap<string, LabHost>,
  ) {}

  /**
   * Creates a bridge and one namespace per host. `subnet` is the lab's third octet: the lab uses 10.213.<subnet>.0/24
   * (gateway .1, hosts .10 and up).
   */
  static create(name: string, hostNames: readonly string[], subnet: number): NetnsLab {
    if (!/^[a-z0-9]{1,6}$/.test(name)) throw new Error(`netns lab name must be 1-6 lowercase letters or digits, got "${name}"`);
    if (!Number.isInteger(subnet) || subnet < 0 || subnet > 255) throw new Error(`netns lab subnet must be 0-255, got ${subnet}`);
    if (hostNames.length > 40) throw new Error('a netns lab has at most 40 hosts');
    const bridge = `flb${name}`;
    const gateway = `10.213.${subnet}.1`;
    const hosts = new Map<string, LabHost>();
    hostNames.forEach((host, i) => {
      if (!/^[a-z0-9]{1,12}$/.test(host)) throw new Error(`netns host name must be 1-12 lowercase letters or digits, got "${host}"`);
      hosts.set(host, { name: host, netns: `fl-${name}-${host}`, address: `10.213.${subnet}.${10 + i}`, link: `flv${name}${i}` });
    });
    const lab = new NetnsLab(name, bridge, gateway, hosts);
    claimLab(name);
    lab.removeLinks(); // a lab of this name left behind by a killed run
    try {
      ip('link', 'add', bridge, 'type', 'bridge');
      ip('addr', 'add', `${gateway}/24`, 'dev', bridge);
      ip('link', 'set', bridge, 'up');
      for (const h of hosts.values()) {
        ip('netns', 'add', h.netns);
        ip('netns', 'exec', h.netns, 'ip', 'link', 'set', 'lo', 'up');
        const peer = `${h.link}p`;
        ip('link', 'add', h.link, 'type', 'veth', 'peer', 'name', peer);
        ip('link', 'set', peer, 'netns', h.netns);
        ip('netns', 'exec', h.netns, 'ip', 'link', 'set', peer, 'name', 'eth0');
        ip('netns', 'exec', h.netns, 'ip', 'addr', 'add', `${h.address}/24`, 'dev', 'eth0');
        ip('netns', 'exec', h.netns, 'ip', 'link', 'set', 'eth0', 'up');
        ip('link', 'set', h.link, 'master', bridge);
        ip('link', 'set', h.link, 'up');
      }
    } catch (err) {
      lab.removeLinks();
      releaseLab(name);
      throw new Error(`netns lab ${name}: ${String((err as { stderr?: Buffer }).stderr ?? err).trim()}`);
    }
    return lab;
  }

  host(name: string): LabHost {
    const h = this.hosts.get(name);
    if (h === undefined) throw new Error(`netns lab ${this.name} has no host "${name}"`);
    return h;
  }

  /** Runs a command inside a host's namespace (killed by `destroy()` if still running). */
  spawn(host: string, command: string, args: readonly string[], options: SpawnOptions = {}): ChildProcess {
    const child = spawn('ip', ['netns', 'exec', this.host(host).netns, command, ...args], options);
    this.children.add(child);
    child.once('exit', () => this.children.delete(child));
    return child;
  }

  /** Cuts a host off: its link goes down. The host's processes live on and keep their sockets. */
  partition(host: string): void {
    ip('link', 'set', this.host(host).link, 'down');
  }

  /** Reconnects a partitioned host. */
  heal(host: string): void {
    ip('link', 'set', this.host(host).link, 'up');
  }

  /** Kills what it started and removes every namespace, link and the bridge. Safe to call twice. */
  async destroy(): Promise<void> {
    const exits = [...this.children].map((child) =>
      child.exitCode !== null || child.signalCode !== null ? Promise.resolve() : new Promise<void>((resolve) => child.once('exit', () => resolve())),
    );
    for (const child of this.children) child.kill('SIGKILL');
    await Promise.all(exits);
    this.removeLinks();
    releaseLab(this.name);
  }

  private removeLinks(): void {
    for (const h of this.hosts.values()) {
      tryIp('link', 'del', h.link); // takes its peer with it
      tryIp('netns', 'del', h.netns);
    }
    tryIp('link', 'del', this.bridge);
  }
}
