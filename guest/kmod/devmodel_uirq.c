// SPDX-License-Identifier: GPL-2.0
/*
 * devmodel_uirq: PCI interrupts (MSI-X, MSI, INTx) counted for guest userspace.
 *
 * Why: a stock distribution kernel gives userspace no MSI or MSI-X without an IOMMU
 * (uio_pci_generic is INTx only, vfio-pci refuses to probe without one). The devmodel
 * guest agent drives devices from userspace through sysfs BAR mappings and needs to see
 * which vector fired, so this driver does the minimum a userspace driver cannot do: it
 * enables the function (memory decode + bus mastering), allocates every MSI-X vector
 * (falling back to MSI, then INTx), and counts interrupts per vector.
 *
 * Binding: no ID table. Bind a function with
 *   echo devmodel_uirq > /sys/bus/pci/devices/<BDF>/driver_override
 *   echo <BDF> > /sys/bus/pci/drivers_probe
 * (or a dynamic ID through new_id). BAR regions are deliberately not requested, so
 * /sys/bus/pci/devices/<BDF>/resourceN stays mappable under IO_STRICT_DEVMEM.
 *
 * Userspace interface, one misc device per bound function, /dev/devmodel-uirq-<BDF>:
 *   read()  : needs a buffer of at least 8 * nvec bytes; returns nvec native-endian u64
 *             per-vector counts. Blocks until any count changed since this open file's
 *             previous read (or since open); O_NONBLOCK gives EAGAIN instead.
 *   poll()  : EPOLLIN when a read would not block; EPOLLHUP once the device is unbound.
 *   write() : INTx mode only: 4 bytes re-enable the line the handler masked.
 * sysfs, in /sys/class/misc/devmodel-uirq-<BDF>/ (also reached from the PCI device's
 * misc/ directory): nvec, mode (msix | msi | intx), counts (space separated).
 */
#include <linux/atomic.h>
#include <linux/fs.h>
#include <linux/interrupt.h>
#include <linux/kref.h>
#include <linux/miscdevice.h>
#include <linux/module.h>
#include <linux/pci.h>
#include <linux/poll.h>
#include <linux/slab.h>
#include <linux/uaccess.h>
#include <linux/wait.h>

#define DRV_NAME "devmodel_uirq"
#define NODE_PREFIX "devmodel-uirq-"
#define COUNT_BYTES sizeof(u64)

#ifdef PCI_IRQ_INTX
#define UIRQ_PCI_IRQ_INTX PCI_IRQ_INTX
#else
#define UIRQ_PCI_IRQ_INTX PCI_IRQ_LEGACY
#endif

enum uirq_mode { UIRQ_MSIX, UIRQ_MSI, UIRQ_INTX };

static const char *const uirq_mode_names[] = {
	[UIRQ_MSIX] = "msix",
	[UIRQ_MSI] = "msi",
	[UIRQ_INTX] = "intx",
};

struct uirq_dev;

/* One per vector: the handler's cookie, so it knows which count to bump. */
struct uirq_vector {
	struct uirq_dev *udev;
	unsigned int index;
	bool requested;
};

/* Lives as long as the binding or any open file, whichever is longer (kref). */
struct uirq_dev {
	struct kref ref;
	struct pci_dev *pdev;
	struct miscdevice misc;
	char name[32];
	enum uirq_mode mode;
	unsigned int nvec;
	bool gone;
	atomic_t events;		/* bumped on every interrupt: readers' change token */
	wait_queue_head_t wait;
	atomic64_t *counts;
	struct uirq_vector *vectors;
};

/* Per open file: the events token its last read returned. */
struct uirq_file {
	struct uirq_dev *udev;
	int seen;
};

static void uirq_free(struct kref *ref)
{
	struct uirq_dev *udev = container_of(ref, struct uirq_dev, ref);

	pci_dev_put(udev->pdev);
	kfree(udev->vectors);
	kfree(udev->counts);
	kfree(udev);
}

static irqreturn_t uirq_handler(int irq, void *cookie)
{
	struct uirq_vector *vec = cookie;
	struct uirq_dev *udev = vec->udev;

	/* A shared INTx line: claim it only if our function asserted it (and mask it). */
	if (udev->mode == UIRQ_INTX && !pci_check_and_mask_intx(udev->pdev))
		return IRQ_NONE;
	atomic64_inc(&udev->counts[vec->index]);
	atomic_inc(&udev->events);
	wake_up_interruptible(&udev->wait);
	return IRQ_HANDLED;
}

static struct uirq_dev *misc_to_udev(struct miscdevice *misc)
{
	return container_of(misc, struct uirq_dev, misc);
}

static int uirq_open(struct inode *inode, struct file *file)
{
	/* misc_open() stored our miscdevice in private_data and holds misc_mtx here. */
	struct uirq_dev *udev = misc_to_udev(file->private_data);
	struct uirq_file *uf = kzalloc(sizeof(*uf), GFP_KERNEL);

	if (!uf)
		return -ENOMEM;
	kref_get(&udev->ref);
	uf->udev = udev;
	uf->seen = atomic_read(&udev->events);
	file->private_data = uf;
	return stream_open(inode, file);
}

static int uirq_release(struct inode *inode, struct file *file)
{
	struct uirq_file *uf = file->private_data;

	kref_put(&uf->udev->ref, uirq_free);
	kfree(uf);
	return 0;
}

static ssize_t uirq_read(struct file *file, char __user *buf, size_t len, loff_t *ppos)
{
	struct uirq_file *uf = file->private_data;
	struct uirq_dev *udev = uf->udev;
	size_t need = udev->nvec * COUNT_BYTES;
	unsigned int i;
	int now;

	if (len < need)
		return -EINVAL;
	for (;;) {
		if (READ_ONCE(udev->gone))
			return -ENODEV;
		now = atomic_read(&udev->events);
		if (now != uf->seen)
			break;
		if (file->f_flags & O_NONBLOCK)
			return -EAGAIN;
		if (wait_event_interruptible(udev->wait,
					     atomic_read(&udev->events) != uf->seen ||
					     READ_ONCE(udev->gone)))
			return -ERESTARTSYS;
	}
	for (i = 0; i < udev->nvec; i++) {
		u64 count = atomic64_read(&udev->counts[i]);

		if (copy_to_user(buf + i * COUNT_BYTES, &count, COUNT_BYTES))
			return -EFAULT;
	}
	uf->seen = now;
	return need;
}

static ssize_t uirq_write(struct file *file, const char __user *buf, size_t len,
			  loff_t *ppos)
{
	struct uirq_file *uf = file->private_data;
	struct uirq_dev *udev = uf->udev;

	if (READ_ONCE(udev->gone))
		return -ENODEV;
	if (udev->mode != UIRQ_INTX)
		return -EINVAL;
	if (len != sizeof(u32))
		return -EINVAL;
	pci_check_and_unmask_intx(udev->pdev);
	return len;
}

static __poll_t uirq_poll(struct file *file, poll_table *wait)
{
	struct uirq_file *uf = file->private_data;
	struct uirq_dev *udev = uf->udev;

	poll_wait(file, &udev->wait, wait);
	if (READ_ONCE(udev->gone))
		return EPOLLHUP | EPOLLERR;
	if (atomic_read(&udev->events) != uf->seen)
		return EPOLLIN | EPOLLRDNORM;
	return 0;
}

static const struct file_operations uirq_fops = {
	.owner = THIS_MODULE,
	.open = uirq_open,
	.release = uirq_release,
	.read = uirq_read,
	.write = uirq_write,
	.poll = uirq_poll,
	/* no .llseek: stream_open() makes lseek fail with ESPIPE */
};

static struct uirq_dev *attr_udev(struct device *dev)
{
	return misc_to_udev(dev_get_drvdata(dev));
}

static ssize_t nvec_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	return sysfs_emit(buf, "%u\n", attr_udev(dev)->nvec);
}
static DEVICE_ATTR_RO(nvec);

static ssize_t mode_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	return sysfs_emit(buf, "%s\n", uirq_mode_names[attr_udev(dev)->mode]);
}
static DEVICE_ATTR_RO(mode);

static ssize_t counts_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	struct uirq_dev *udev = attr_udev(dev);
	unsigned int i;
	int len = 0;

	for (i = 0; i < udev->nvec; i++)
		len += sysfs_emit_at(buf, len, "%s%llu", i ? " " : "",
				     (unsigned long long)atomic64_read(&udev->counts[i]));
	len += sysfs_emit_at(buf, len, "\n");
	return len;
}
static DEVICE_ATTR_RO(counts);

static struct attribute *uirq_attrs[] = {
	&dev_attr_nvec.attr,
	&dev_attr_mode.attr,
	&dev_attr_counts.attr,
	NULL,
};
ATTRIBUTE_GROUPS(uirq);

/* MSI-X vectors (all the function has, if possible), else MSI, else the INTx line. */
static int uirq_alloc_vectors(struct uirq_dev *udev)
{
	struct pci_dev *pdev = udev->pdev;
	int want, got;

	want = pci_msix_vec_count(pdev);
	if (want > 0) {
		/* Every table entry if the system has them, else as many as it can give. */
		got = pci_alloc_irq_vectors(pdev, 1, want, PCI_IRQ_MSIX);
		if (got > 0) {
			udev->mode = UIRQ_MSIX;
			return got;
		}
		pci_info(pdev, "MSI-X allocation of %d vectors failed (%d)\n", want, got);
	}
	want = pci_msi_vec_count(pdev);
	if (want > 0) {
		got = pci_alloc_irq_vectors(pdev, 1, want, PCI_IRQ_MSI);
		if (got > 0) {
			udev->mode = UIRQ_MSI;
			return got;
		}
		pci_info(pdev, "MSI allocation failed (%d)\n", got);
	}
	got = pci_alloc_irq_vectors(pdev, 1, 1, UIRQ_PCI_IRQ_INTX);
	if (got > 0)
		udev->mode = UIRQ_INTX;
	return got;
}

static void uirq_free_irqs(struct uirq_dev *udev)
{
	unsigned int i;

	for (i = 0; i < udev->nvec; i++)
		if (udev->vectors[i].requested)
			free_irq(pci_irq_vector(udev->pdev, i), &udev->vectors[i]);
	pci_free_irq_vectors(udev->pdev);
}

static int uirq_request_irqs(struct uirq_dev *udev)
{
	unsigned long flags = udev->mode == UIRQ_INTX ? IRQF_SHARED : 0;
	unsigned int i;
	int ret;

	for (i = 0; i < udev->nvec; i++) {
		udev->vectors[i].udev = udev;
		udev->vectors[i].index = i;
		ret = request_irq(pci_irq_vector(udev->pdev, i), uirq_handler, flags,
				  DRV_NAME, &udev->vectors[i]);
		if (ret)
			return ret;
		udev->vectors[i].requested = true;
	}
	return 0;
}

static int uirq_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	struct uirq_dev *udev;
	int nvec, ret;

	udev = kzalloc(sizeof(*udev), GFP_KERNEL);
	if (!udev)
		return -ENOMEM;
	kref_init(&udev->ref);
	udev->pdev = pci_dev_get(pdev);
	init_waitqueue_head(&udev->wait);
	snprintf(udev->name, sizeof(udev->name), NODE_PREFIX "%s", pci_name(pdev));

	ret = pci_enable_device(pdev);
	if (ret)
		goto err_put;
	pci_set_master(pdev);

	nvec = uirq_alloc_vectors(udev);
	if (nvec <= 0) {
		ret = nvec ? nvec : -ENODEV;
		pci_err(pdev, "no interrupt could be allocated (%d)\n", ret);
		goto err_disable;
	}
	udev->nvec = nvec;
	udev->counts = kcalloc(nvec, sizeof(*udev->counts), GFP_KERNEL);
	udev->vectors = kcalloc(nvec, sizeof(*udev->vectors), GFP_KERNEL);
	if (!udev->counts || !udev->vectors) {
		ret = -ENOMEM;
		goto err_irqs;
	}
	ret = uirq_request_irqs(udev);
	if (ret)
		goto err_irqs;

	udev->misc.minor = MISC_DYNAMIC_MINOR;
	udev->misc.name = udev->name;
	udev->misc.fops = &uirq_fops;
	udev->misc.parent = &pdev->dev;
	udev->misc.groups = uirq_groups;
	udev->misc.mode = 0600;
	ret = misc_register(&udev->misc);
	if (ret)
		goto err_irqs;

	pci_set_drvdata(pdev, udev);
	pci_info(pdev, "%u %s vector(s) at /dev/%s\n", nvec, uirq_mode_names[udev->mode],
		 udev->name);
	return 0;

err_irqs:
	uirq_free_irqs(udev);
err_disable:
	pci_clear_master(pdev);
	pci_disable_device(pdev);
err_put:
	kref_put(&udev->ref, uirq_free);
	return ret;
}

static void uirq_remove(struct pci_dev *pdev)
{
	struct uirq_dev *udev = pci_get_drvdata(pdev);

	/* No new opens after this; open files see ENODEV / EPOLLHUP. */
	misc_deregister(&udev->misc);
	uirq_free_irqs(udev);
	WRITE_ONCE(udev->gone, true);
	wake_up_interruptible_all(&udev->wait);
	pci_clear_master(pdev);
	pci_disable_device(pdev);
	pci_set_drvdata(pdev, NULL);
	kref_put(&udev->ref, uirq_free);
}

static struct pci_driver uirq_driver = {
	.name = DRV_NAME,
	.id_table = NULL,	/* bound only through driver_override or new_id */
	.probe = uirq_probe,
	.remove = uirq_remove,
};

module_pci_driver(uirq_driver);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("devmodel test guest: per-vector PCI interrupt counts for userspace");
